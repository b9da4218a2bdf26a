"""The Sparse Ternary AutoEncoder (after Shiri et al., PRIMIS, J. Biomed. Inform. 2024).

Data flow (D = stem * 2**(S-1) for S scales; h, w = H/D, W/D)::

    x (B,1,H,W) in [0,1]
      |  PixelUnshuffle(stem) + conv          -> scale 0
      |  residual stride-2 blocks              -> scales 1..S-1
      |  skip branch from every scale to h x w, concatenated, 1x1 conv -> (B, m*n, h, w)
      |  grouped projection (one linear map per code map), standardised over n
      |  (atom_norm: each atom's score first standardised over the batch)
      v
    z (B,m,n,h,w) --ternarize--> t in {-1,0,+1}: exactly k entries +1 and k entries -1 per vector
      |  (adaptive rate: only the pairs stronger than the map's learned threshold, s <= k)
      |  values (real mode) or learned magnitudes +beta_pos / -beta_neg (ternary mode)
      |  transposed grouped projection, 1x1 conv, mirrored residual upsampling, PixelShuffle
      v
    x_hat (B,1,H,W)

`forward` serves training (it blends real values into ternary ones during warm-up); `encode`
and `decode` move between images and the integer ternary code used for sharing; `refine`
searches, per image, for a code the decoder reconstructs better than the encoder's.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from primis.config import ModelConfig
from primis.keys.enumerative import ternary_support_bits

# Adaptive rate (`ModelConfig.adaptive_rate`): in training each pair gate passes back the
# gradient of sigmoid((strength - threshold) / GATE_TEMPERATURE), in units of the scores' root
# mean square; thresholds start at THRESHOLD_START, below the strength of every pair (scores
# all tied aside), so training starts with every pair kept.
GATE_TEMPERATURE = 0.5
THRESHOLD_START = 0.0


def use_autocast(device: torch.device, amp: bool) -> bool:
    """bfloat16 autocast: on CUDA, and on CPUs with native bfloat16 (AVX512-BF16 or AMX) whose
    AVX512 kernels torch uses (`ATEN_CPU_CAPABILITY=avx2` turns it off, as on an AVX2 CPU);
    elsewhere bfloat16 would be emulated, slower than float32."""
    if not amp:
        return False
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return native and torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    return False


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class ResidualDown(nn.Module):
    """Halve the resolution: strided conv path plus a pixel-unshuffle shortcut."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(cout, cout, 3, padding=1),
        )
        self.shortcut = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(4 * cin, cout, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.shortcut(x) + self.body(x)


class ResidualUp(nn.Module):
    """Double the resolution: pixel-shuffle path plus a pixel-shuffle shortcut."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, 4 * cout, 3, padding=1),
            nn.PixelShuffle(2),
            nn.GELU(),
            nn.Conv2d(cout, cout, 3, padding=1),
        )
        self.shortcut = nn.Sequential(nn.Conv2d(cin, 4 * cout, 1), nn.PixelShuffle(2))

    def forward(self, x: Tensor) -> Tensor:
        return self.shortcut(x) + self.body(x)


def _flat_index(shape: torch.Size, index: Tensor) -> Tensor:
    """Row-major positions, in a tensor of ``shape`` (B,m,n,h,w), of ``index`` along dim 2.

    `take` and `put_` read and write through these (on CPU much faster than `gather` and
    `scatter_` with a source tensor); both count positions in row-major order, whatever the
    memory layout.
    """
    strides = torch.ones(len(shape), dtype=torch.long)
    for dim in range(len(shape) - 2, -1, -1):
        strides[dim] = strides[dim + 1] * shape[dim + 1]
    flat = index * int(strides[2])
    for dim in (0, 1, 3, 4):
        view = [1] * len(shape)
        view[dim] = -1
        flat = flat + torch.arange(shape[dim], device=index.device).view(view) * int(strides[dim])
    return flat


def refine_scores(
    z: Tensor,
    steps: int,
    error_and_gradient: Callable[[Tensor], tuple[Tensor, Tensor]],
    lr: float = 0.05,
    on_step: Callable[[], None] | None = None,
) -> Tensor:
    """``steps`` Adam steps on scores ``z`` (B,m,n,h,w), where ``error_and_gradient(z)`` gives
    each image's reconstruction error (B,) and its gradient through the straight-through code;
    returns ``z`` itself, refined in place: for each image, the scores of the best code seen
    (the starting one included). ``on_step`` is called after each step (for progress)."""
    # Memory: a large image's scores take hundreds of MB, so no step makes a copy of them that
    # it can avoid: the optimiser works on z's own storage, its fused step makes no temporaries,
    # rows are copied in place and the gradient is dropped once used.
    best = z.clone()
    best_error = torch.full((z.shape[0],), torch.inf, device=z.device)
    z = z.detach().requires_grad_(True)
    fused = z.device.type in ("cpu", "cuda") or None  # where torch has the fused step
    optimizer = torch.optim.Adam([z], lr=lr, fused=fused)
    for step in range(steps + 1):
        error, gradient = error_and_gradient(z.detach())
        improved = error < best_error
        for row in improved.nonzero().flatten().tolist():
            best[row].copy_(z.detach()[row])
        best_error = torch.where(improved, error, best_error)
        if step == steps:
            break
        z.grad = gradient
        del gradient
        optimizer.step()
        z.grad = None
        if on_step is not None:
            on_step()
    del optimizer  # its state, before z takes the best scores
    return z.detach().copy_(best)


def choose_code(
    network: SparseTernaryAutoEncoder,
    z: Tensor,
    k: int,
    steps: int,
    refine: Callable[[Tensor, int, Tensor | None], Tensor],
    rate: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """The ternary code (int8) of scores ``z`` after ``steps`` refinement steps, where
    ``refine(scores, steps, bias)`` returns refined scores.

    With ``rate``, a function from a code to the key bits of each of its atoms times the weight
    of a bit (a bias as `select` takes it), the code is rate-distortion optimised in two
    rounds: the bias of the code so far steers half of the steps and the code they reach, whose
    bias then steers the other half and the final choice. The rest of the code adapts to the
    atoms the bias prefers, which is why a weight costs less quality with refinement than
    without (then the two rounds only re-choose atoms)."""
    if rate is None:
        return network.ternarize(refine(z, steps, None) if steps else z, k)
    code = network.ternarize(z, k)
    for part in (steps // 2, steps - steps // 2):
        bias = rate(code)
        z = refine(z, part, bias) if part else z
        code = network.ternarize(z, k, bias)
        del bias  # not in memory while the next one is made
    return code


def _stage(channels: int, blocks: int) -> nn.Sequential:
    return nn.Sequential(*(ResidualBlock(channels) for _ in range(blocks)))


class SparseTernaryAutoEncoder(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c, m, n = config.channels, config.m, config.n
        scales = len(c)
        pad = config.projection_kernel // 2

        self.stem = nn.Sequential(
            nn.PixelUnshuffle(config.stem), nn.Conv2d(config.stem**2, c[0], 3, padding=1)
        )
        depths = [config.blocks] * (scales - 1) + [config.blocks + config.encoder_blocks]
        self.encoder_stages = nn.ModuleList([_stage(c[0], depths[0])])
        self.downs = nn.ModuleList()
        for i in range(1, scales):
            self.downs.append(ResidualDown(c[i - 1], c[i]))
            self.encoder_stages.append(_stage(c[i], depths[i]))
        # Skip branches: every scale straight to the code grid (kernel = stride = scale factor).
        self.skips = nn.ModuleList(
            nn.Conv2d(c[i], c[-1], 2 ** (scales - 1 - i), stride=2 ** (scales - 1 - i))
            for i in range(scales)
        )
        self.to_code = nn.Conv2d(scales * c[-1], m * n, 1)
        self.projection = nn.Conv2d(m * n, m * n, config.projection_kernel, padding=pad, groups=m)
        # Per-atom standardisation over the batch: without it training can collapse onto a few
        # of the n atoms (MODEL_CARD.md has the measurement); with it every atom stays in use.
        self.atom_norm = nn.BatchNorm2d(m * n, affine=False) if config.atom_norm else None

        # Magnitudes start at the mean of the k largest of n standard normal scores, so the
        # pure-ternary code starts on the scale of the real-valued one it replaces.
        start = torch.randn(1024, n, generator=torch.Generator().manual_seed(0))
        start = float(start.topk(config.k, dim=1).values.mean())
        self.beta_pos = nn.Parameter(torch.full((m, n), start))
        self.beta_neg = nn.Parameter(torch.full((m, n), start))
        # Adaptive rate: each map's threshold on pair strengths (part of the encoding), and what
        # the j-th pair of a vector adds to a strict-mode key, in bits (not saved: computed).
        self.thresholds = (
            nn.Parameter(torch.full((m,), THRESHOLD_START)) if config.adaptive_rate else None
        )
        if config.adaptive_rate:
            bits = np.diff(ternary_support_bits(n, np.arange(config.k + 1)))
            self.register_buffer("pair_bits", torch.tensor(bits, dtype=torch.float32), False)
        self.inverse_projection = nn.ConvTranspose2d(
            m * n, m * n, config.projection_kernel, padding=pad, groups=m
        )
        self.from_code = nn.Sequential(nn.Conv2d(m * n, c[-1], 1), nn.GELU())
        self.decoder_stages = nn.ModuleList()
        self.ups = nn.ModuleList()
        for i in range(scales - 1, 0, -1):
            self.decoder_stages.append(_stage(c[i], config.blocks + 1))
            self.ups.append(ResidualUp(c[i], c[i - 1]))
        self.decoder_stages.append(_stage(c[0], config.blocks + 1))
        self.head = nn.Sequential(
            nn.Conv2d(c[0], config.stem**2, 3, padding=1), nn.PixelShuffle(config.stem)
        )

    def decoder_parameters(self) -> list[nn.Parameter]:
        """What decoding uses: magnitudes, inverse projection and synthesis (not the encoder)."""
        modules = [self.inverse_projection, self.from_code, self.decoder_stages, self.ups]
        parameters = [p for module in [*modules, self.head] for p in module.parameters()]
        return [self.beta_pos, self.beta_neg, *parameters]

    def encoder_parameters(self) -> list[nn.Parameter]:
        """What encoding uses: every parameter that `decoder_parameters` does not list."""
        decoder = {id(p) for p in self.decoder_parameters()}
        return [p for p in self.parameters() if id(p) not in decoder]

    # ----------------------------------------------------------------- analysis / synthesis
    def _code_transform(self) -> tuple[Tensor, Tensor]:
        """The sparsifying projection's weights, centred over the n atoms of each code map.

        Centring the weights centres every score vector z exactly, with no pass over z. With a
        1x1 projection, the encoder's 1x1 map is folded in: one (m*n, C) matrix in place of two
        maps over every position (same function, about half of the paper configuration's work).
        """
        m, n = self.config.m, self.config.n
        weight = self.projection.weight.view(m, n, -1)
        bias = self.projection.bias.view(m, n)
        if self.config.projection_kernel == 1:
            to_code = self.to_code.weight.view(m, n, -1)
            bias = bias + torch.einsum("gij,gj->gi", weight, self.to_code.bias.view(m, n))
            weight = torch.einsum("gij,gjc->gic", weight, to_code)
        weight = weight - weight.mean(dim=1, keepdim=True)
        bias = bias - bias.mean(dim=1, keepdim=True)
        shape = (m * n, -1, *self.projection.weight.shape[2:])
        return weight.reshape(shape), bias.reshape(m * n)

    def _inverse_transform(self, values: Tensor) -> Tensor:
        """Transposed projection then the decoder's 1x1 map (folded into one for a 1x1 kernel)."""
        b, m, n, h, w = values.shape
        values = values.reshape(b, m * n, h, w)
        if self.config.projection_kernel > 1:
            return self.from_code(self.inverse_projection(values))
        inverse = self.inverse_projection.weight.view(m, n, n)
        from_code = self.from_code[0].weight.view(-1, m, n)
        weight = torch.einsum("cgj,gij->cgi", from_code, inverse).reshape(-1, m * n, 1, 1)
        bias = self.from_code[0].bias + from_code.reshape(-1, m * n) @ self.inverse_projection.bias
        return self.from_code[1](F.conv2d(values, weight, bias))

    def analysis(self, x: Tensor, normalize: bool = True) -> Tensor:
        """Image (B,1,H,W), H and W multiples of the downsampling -> scores z (B,m,n,h,w);
        without ``normalize``, before `normalize_scores` (for scores computed tile by tile)."""
        feature = self.encoder_stages[0](self.stem(x - 0.5))
        features = [feature]
        for down, stage in zip(self.downs, self.encoder_stages[1:], strict=True):
            feature = stage(down(feature))
            features.append(feature)
        merged = torch.cat([skip(f) for skip, f in zip(self.skips, features, strict=True)], 1)
        weight, bias = self._code_transform()
        if self.config.projection_kernel > 1:
            merged = self.to_code(merged)
        kernel, m = self.config.projection_kernel, self.config.m
        z = F.conv2d(merged, weight, bias, padding=kernel // 2, groups=1 if kernel == 1 else m)
        b, _, h, w = z.shape
        z = z.view(b, m, self.config.n, h, w)
        if self.atom_norm is not None:
            z = self.atom_norm(z.flatten(1, 2)).view_as(z)
            z = z - z.mean(dim=2, keepdim=True)  # standardising per atom undid the centring
        return self.normalize_scores(z) if normalize else z

    @staticmethod
    def normalize_scores(z: Tensor) -> Tensor:
        """Scores divided by their root mean square per image and code map: selection stays
        scale-free, and flat regions (where a per-vector scale would divide by ~0) cannot blow
        the gradients up."""
        rms = torch.linalg.vector_norm(z, dim=(2, 3, 4), keepdim=True) / (z[0, 0].numel() ** 0.5)
        return z / (rms + 1e-6)

    def synthesis(self, values: Tensor) -> Tensor:
        """Decoder input (B,m,n,h,w) -> image (B,1,H,W), roughly in [0,1]."""
        y = self._inverse_transform(values)
        for stage, up in zip(self.decoder_stages, self.ups, strict=False):
            y = up(stage(y))
        return self.head(self.decoder_stages[-1](y)) + 0.5

    # ---------------------------------------------------------------------------- the code
    @staticmethod
    def select(z: Tensor, k: int, bias: Tensor | None = None) -> Tensor:
        """Atom indices (B,m,2k,h,w): the k largest scores of each vector, then the k smallest.

        The k largest are taken first and excluded from the k smallest, so even tied scores
        give disjoint sets. A ``bias`` (2,B,m,n,h,w) is a cost per atom and sign: the +1 entries
        go to the k largest of ``z - bias[0]``, the -1 entries to the k smallest of
        ``z + bias[1]`` (rate-distortion optimised coding, see `primis.sharing`).
        """
        top = (z if bias is None else z - bias[0]).topk(k, dim=2).indices
        lower = z if bias is None else z + bias[1]
        excluded = lower.scatter(2, top, torch.finfo(z.dtype).max)
        return torch.cat([top, excluded.topk(k, dim=2, largest=False).indices], 2)

    def _pair_margins(self, z: Tensor, flat: Tensor, k: int, bias: Tensor | None = None) -> Tensor:
        """(B,m,k,h,w), adaptive rate: each pair's strength less its map's threshold, for the
        atoms `select` chose at positions ``flat`` (`_flat_index`). Pair j is the j-th +1 and
        the j-th -1 atom; its strength is half the gap between the two scores they were ranked
        by (with ``bias``, the biased ones), so it falls with j: a vector keeps its first s
        pairs, those of positive margin."""
        top, bottom = z.take(flat[:, :, :k]), z.take(flat[:, :, k:])
        if bias is not None:
            top = top - bias[0].take(flat[:, :, :k])
            bottom = bottom + bias[1].take(flat[:, :, k:])
        return (top - bottom) / 2 - self.thresholds.view(1, -1, 1, 1, 1)

    def _kept_pairs(self, z: Tensor, chosen: Tensor, k: int, bias: Tensor | None) -> Tensor:
        """(B,m,k,h,w) int8: 1 for each pair of `select`'s atoms ``chosen`` that the code keeps
        (all of them unless the rate is adaptive)."""
        if self.thresholds is None:
            return torch.ones_like(chosen[:, :, :k], dtype=torch.int8)
        margins = self._pair_margins(z.detach(), _flat_index(z.shape, chosen), k, bias)
        return (margins > 0).to(torch.int8)

    def ternarize(self, z: Tensor, k: int, bias: Tensor | None = None) -> Tensor:
        """Exactly k entries +1 (largest scores) and k entries -1 (smallest) per vector, int8
        (``bias`` as in `select`); with an adaptive rate only the kept pairs (`_pair_margins`):
        s <= k entries of each sign."""
        chosen = self.select(z.detach(), k, bias)
        t = torch.zeros(z.shape, dtype=torch.int8, device=z.device)
        if self.thresholds is None:
            return t.scatter_(2, chosen[:, :, :k], 1).scatter_(2, chosen[:, :, k:], -1)
        kept = self._kept_pairs(z, chosen, k, bias)
        return t.scatter_(2, chosen[:, :, :k], kept).scatter_(2, chosen[:, :, k:], -kept)

    def magnitudes(self, t: Tensor) -> Tensor:
        """Pure-ternary decoder input: +beta_pos where t=+1, -beta_neg where t=-1, else 0."""
        shape = (1, *self.beta_pos.shape, 1, 1)
        pos = (t > 0).to(self.beta_pos.dtype) * self.beta_pos.view(shape)
        neg = (t < 0).to(self.beta_neg.dtype) * self.beta_neg.view(shape)
        return pos - neg

    @torch.no_grad()
    def selected_score_sums(self, x: Tensor, k: int | None = None) -> Tensor:
        """(2, 2, m, n): for the +1 and the -1 selections (the kept pairs only), each atom's sum
        of |score| and its count. Their ratio is the constant magnitude closest (least squares)
        to the real code."""
        k = k or self.config.k
        z = self.analysis(x).float()
        chosen = self.select(z, k)
        kept = self._kept_pairs(z, chosen, k, None).float().repeat(1, 1, 2, 1, 1)
        real = z.gather(2, chosen).abs() * kept
        m, n = self.config.m, self.config.n
        sums = z.new_zeros(2, 2, m, n)
        for sign, part in enumerate((slice(0, k), slice(k, 2 * k))):
            atoms = chosen[:, :, part].transpose(0, 1).reshape(m, -1)
            sums[sign, 0].scatter_add_(1, atoms, real[:, :, part].transpose(0, 1).reshape(m, -1))
            sums[sign, 1].scatter_add_(1, atoms, kept[:, :, part].transpose(0, 1).reshape(m, -1))
        return sums

    @torch.no_grad()
    def fit_magnitudes(self, sums: Tensor) -> None:
        """Set each atom's magnitudes to its mean selected |score| from `selected_score_sums`
        (atoms never selected keep theirs), so the ternary code starts where the real one is."""
        for beta, (total, count) in zip((self.beta_pos, self.beta_neg), sums, strict=True):
            seen = count > 0
            beta[seen] = total[seen] / count[seen]

    def _selected_magnitudes(self, chosen: Tensor, k: int) -> Tensor:
        """`magnitudes` at the indices of `select` only: +beta_pos for the first k, -beta_neg for
        the last k."""
        m, n = self.config.m, self.config.n
        negative = torch.arange(2 * k, device=chosen.device).view(1, 1, -1, 1, 1) >= k
        offset = torch.arange(m, device=chosen.device).view(1, -1, 1, 1, 1) * n + negative * m * n
        betas = torch.cat([self.beta_pos, self.beta_neg]).view(-1)
        return betas[chosen + offset] * (1 - 2 * negative.to(betas.dtype))

    def forward(
        self,
        x: Tensor,
        k: int | None = None,
        ternary_weight: float = 1.0,
        straight_through: float = 0.0,
        map_mask: Tensor | None = None,
        with_bits: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Training reconstruction; ``with_bits`` (adaptive rate): and each image's key bits
        (B,), differentiable (`_key_bits`).

        ``ternary_weight`` blends the real-valued sparse code (0.0) into the pure-ternary code
        (1.0); the encoder learns through the real share. ``straight_through`` s > 0 passes the
        gradient at every entry of the decoder's input, selected or not, times s to the scores
        (the straight-through estimator of the whole ternary quantiser): it tells unselected atoms
        whether they should enter the code, so pure-ternary training learns the selection itself.
        ``map_mask`` (B, m) of 0/1 zeroes code maps, as a key that opens only some maps does.

        With an adaptive rate each pair's two values are multiplied by its gate: 1 where
        `_pair_margins` is positive, else 0, with the gradient of a sigmoid of the margin (a
        straight-through gate), so the encoder and the thresholds learn which pairs to keep.

        Only the 2k selected entries of each vector are computed on; the decoder gets them
        scattered into zeros, exactly the dense code of `magnitudes` / the real sparse code.
        """
        k = k or self.config.k
        dense, gates = self._decoder_input(self.analysis(x), k, ternary_weight, straight_through)
        if map_mask is not None:
            dense = dense * map_mask.to(dense.dtype)[:, :, None, None, None]
        reconstruction = self.synthesis(dense)
        if not with_bits:
            return reconstruction
        if gates is None:
            raise ValueError("key bits in training need a model with an adaptive rate")
        return reconstruction, self._key_bits(gates)

    def _key_bits(self, gates: Tensor) -> Tensor:
        """(B,) each image's strict-mode key bits for its pair gates (B,m,k,h,w): a kept pair j
        costs `pair_bits`[j], what it adds to the ideal count of the vector's support and signs
        (the counts' own cost left out). Gates are nested, so this is the code's exact count."""
        cost = self.pair_bits[: gates.shape[2]].view(1, 1, -1, 1, 1)
        return (gates.float() * cost).sum(dim=(1, 2, 3, 4))

    def _decoder_input(
        self,
        z: Tensor,
        k: int,
        ternary_weight: float = 1.0,
        straight_through: float = 0.0,
        bias: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Scores (B,m,n,h,w) -> the dense sparse code the decoder reads and, with an adaptive
        rate, the pair gates (B,m,k,h,w), else None (see `forward`; ``bias`` as in
        `select`)."""
        chosen = self.select(z.detach(), k, bias)
        flat = _flat_index(z.shape, chosen)
        real = z.take(flat) if ternary_weight < 1 else None
        if ternary_weight <= 0:
            values = real
        else:
            values = self._selected_magnitudes(chosen, k)
            if ternary_weight < 1:
                values = ternary_weight * values + (1 - ternary_weight) * real
        gates = None
        if self.thresholds is not None:
            margins = self._pair_margins(z, flat, k, bias)
            soft = torch.sigmoid(margins / GATE_TEMPERATURE)
            gates = (margins > 0).to(soft.dtype) + (soft - soft.detach())
            values = values * gates.repeat(1, 1, 2, 1, 1)
        dense = torch.zeros(z.shape, dtype=z.dtype, device=z.device).put_(flat, values.to(z.dtype))
        if straight_through:
            dense = dense + straight_through * (z - z.detach())  # zero, but carries gradient
        return dense, gates

    def squared_error(
        self, z: Tensor, x: Tensor, valid: Tensor, k: int, bias: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Per image, the squared error of the ternary code of scores ``z`` (selected with
        ``bias`` as in `select`) summed over the pixels where ``valid`` (B,1,H,W) is 1, and its
        straight-through gradient with respect to ``z``. The decoder runs in bfloat16 where the
        device has it natively (`use_autocast`)."""
        z = z.detach().requires_grad_(True)
        low_precision = use_autocast(x.device, amp=True)
        with torch.enable_grad():
            dense, _ = self._decoder_input(z, k, straight_through=1.0, bias=bias)
            with torch.autocast(x.device.type, torch.bfloat16, enabled=low_precision):
                reconstruction = self.synthesis(dense)
            error = (((reconstruction.float() - x) ** 2) * valid).sum(dim=(1, 2, 3))
            (gradient,) = torch.autograd.grad(error.sum(), z)
        return error.detach(), gradient

    def refine(
        self,
        x: Tensor,
        k: int,
        steps: int,
        valid: Tensor | None = None,
        lr: float = 0.05,
        on_step: Callable[[], None] | None = None,
        z: Tensor | None = None,
        bias: Tensor | None = None,
    ) -> Tensor:
        """Scores (B,m,n,h,w) whose ternary code reconstructs ``x`` at least as well as the
        encoder's own, or as the code of the scores ``z`` to start from, which are refined in
        place and returned (see `refine_scores`, which calls ``on_step``; ``bias`` as in
        `select`).

        The decoder and the code format are untouched; only the choice of code improves (the
        encoder's one pass leaves a gap). ``valid`` (B,1,H,W) of 0/1 marks the pixels that count
        (not the padding). Images do not interact: each one's result is the same in any batch.
        """
        valid = torch.ones_like(x) if valid is None else valid.to(x.dtype)
        area = valid.sum(dim=(1, 2, 3))
        if z is None:
            with torch.no_grad():
                z = self.analysis(x).float()

        def mean_error(scores: Tensor) -> tuple[Tensor, Tensor]:
            error, gradient = self.squared_error(scores, x, valid, k, bias)
            return error / area, gradient.div_(area.view(-1, 1, 1, 1, 1))

        return refine_scores(z, steps, mean_error, lr, on_step)

    @torch.no_grad()
    def encode(
        self,
        x: Tensor,
        k: int | None = None,
        refine_steps: int = 0,
        valid: Tensor | None = None,
        on_step: Callable[[], None] | None = None,
        rate: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """Images (B,1,H,W) -> ternary code (B,m,n,h,w), int8; with ``refine_steps`` the code
        `refine` finds (``valid`` and ``on_step`` as there), rate-distortion optimised with
        ``rate`` (see `choose_code`)."""
        k = k or self.config.k
        if not 1 <= k <= self.config.n // 2:
            raise ValueError(f"k={k} outside 1..{self.config.n // 2}")
        if not refine_steps and rate is None:
            return self.ternarize(self.analysis(x), k)

        def refine(scores: Tensor, steps: int, bias: Tensor | None) -> Tensor:
            return self.refine(x, k, steps, valid, on_step=on_step, z=scores, bias=bias)

        return choose_code(self, self.analysis(x).float(), k, refine_steps, refine, rate)

    @torch.no_grad()
    def decode(self, t: Tensor) -> Tensor:
        """Ternary code (B,m,n,h,w) -> images (B,1,H,W) clamped to [0,1]."""
        return self.synthesis(self.magnitudes(t)).clamp(0, 1)
