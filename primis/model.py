"""The Sparse Ternary AutoEncoder (after Shiri et al., PRIMIS, J. Biomed. Inform. 2024).

Data flow (D = stem * 2**(S-1) for S scales; h, w = H/D, W/D)::

    x (B,1,H,W) in [0,1]
      |  PixelUnshuffle(stem) + conv          -> scale 0
      |  residual stride-2 blocks              -> scales 1..S-1
      |  skip branch from every scale to h x w, concatenated, 1x1 conv -> (B, m*n, h, w)
      |  grouped projection (one linear map per code map), standardised over n
      v
    z (B,m,n,h,w) --ternarize--> t in {-1,0,+1}: exactly k entries +1 and k entries -1 per vector
      |  values (real mode) or learned magnitudes +beta_pos / -beta_neg (ternary mode)
      |  transposed grouped projection, 1x1 conv, mirrored residual upsampling, PixelShuffle
      v
    x_hat (B,1,H,W)

`forward` serves training (it blends real values into ternary ones during warm-up); `encode`
and `decode` move between images and the integer ternary code used for sharing.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from primis.config import ModelConfig


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
        self.encoder_stages = nn.ModuleList([_stage(c[0], config.blocks)])
        self.downs = nn.ModuleList()
        for i in range(1, scales):
            self.downs.append(ResidualDown(c[i - 1], c[i]))
            self.encoder_stages.append(_stage(c[i], config.blocks))
        # Skip branches: every scale straight to the code grid (kernel = stride = scale factor).
        self.skips = nn.ModuleList(
            nn.Conv2d(c[i], c[-1], 2 ** (scales - 1 - i), stride=2 ** (scales - 1 - i))
            for i in range(scales)
        )
        self.to_code = nn.Conv2d(scales * c[-1], m * n, 1)
        self.projection = nn.Conv2d(m * n, m * n, config.projection_kernel, padding=pad, groups=m)

        # Magnitudes start at the mean of the k largest of n standard normal scores, so the
        # pure-ternary code starts on the scale of the real-valued one it replaces.
        start = torch.randn(1024, n, generator=torch.Generator().manual_seed(0))
        start = float(start.topk(config.k, dim=1).values.mean())
        self.beta_pos = nn.Parameter(torch.full((m, n), start))
        self.beta_neg = nn.Parameter(torch.full((m, n), start))
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

    # ----------------------------------------------------------------- analysis / synthesis
    def analysis(self, x: Tensor) -> Tensor:
        """Image (B,1,H,W), H and W multiples of the downsampling -> scores z (B,m,n,h,w)."""
        feature = self.encoder_stages[0](self.stem(x - 0.5))
        features = [feature]
        for down, stage in zip(self.downs, self.encoder_stages[1:], strict=True):
            feature = stage(down(feature))
            features.append(feature)
        merged = torch.cat([skip(f) for skip, f in zip(self.skips, features, strict=True)], 1)
        z = self.projection(self.to_code(merged))
        b, _, h, w = z.shape
        z = z.view(b, self.config.m, self.config.n, h, w)
        z = z - z.mean(dim=2, keepdim=True)
        # One scale per image and code map: selection stays scale-free, and flat regions (where
        # a per-vector scale would divide by ~0) cannot blow the gradients up.
        return z / (z.pow(2).mean(dim=(2, 3, 4), keepdim=True).sqrt() + 1e-6)

    def synthesis(self, values: Tensor) -> Tensor:
        """Decoder input (B,m,n,h,w) -> image (B,1,H,W), roughly in [0,1]."""
        b, m, n, h, w = values.shape
        y = self.from_code(self.inverse_projection(values.reshape(b, m * n, h, w)))
        for stage, up in zip(self.decoder_stages, self.ups, strict=False):
            y = up(stage(y))
        return self.head(self.decoder_stages[-1](y)) + 0.5

    # ---------------------------------------------------------------------------- the code
    @staticmethod
    def ternarize(z: Tensor, k: int) -> Tensor:
        """Exactly k entries +1 (largest scores) and k entries -1 (smallest) per vector.

        The k largest are taken first and excluded from the k smallest, so even tied scores
        give disjoint sets.
        """
        scores = z.detach().movedim(2, -1).contiguous()
        top = scores.topk(k, dim=-1).indices
        t = torch.zeros_like(scores, dtype=torch.int8).scatter_(-1, top, 1)
        excluded = scores.scatter(-1, top, torch.finfo(scores.dtype).max)
        bottom = excluded.topk(k, dim=-1, largest=False).indices
        return t.scatter_(-1, bottom, -1).movedim(-1, 2)

    def magnitudes(self, t: Tensor) -> Tensor:
        """Pure-ternary decoder input: +beta_pos where t=+1, -beta_neg where t=-1, else 0."""
        shape = (1, *self.beta_pos.shape, 1, 1)
        pos = (t > 0).to(self.beta_pos.dtype) * self.beta_pos.view(shape)
        neg = (t < 0).to(self.beta_neg.dtype) * self.beta_neg.view(shape)
        return pos - neg

    def forward(
        self,
        x: Tensor,
        k: int | None = None,
        ternary_weight: float = 1.0,
        straight_through: float = 0.0,
        map_mask: Tensor | None = None,
    ) -> Tensor:
        """Training reconstruction.

        ``ternary_weight`` blends the real-valued sparse code (0.0) into the pure-ternary code
        (1.0). The encoder learns through the real share; ``straight_through`` > 0 also passes
        that fraction of the ternary share's gradient to the selected scores (measured unstable
        at full strength, so off by default: pure-ternary steps then tune decoder and magnitudes).
        ``map_mask`` (B, m) of 0/1 zeroes code maps, as a key that opens only some maps does.
        """
        z = self.analysis(x)
        t = self.ternarize(z.detach(), k or self.config.k)
        real = z * t.abs().to(z.dtype) if ternary_weight < 1 or straight_through else None
        if ternary_weight <= 0:
            values = real
        else:
            values = self.magnitudes(t)
            if straight_through:
                values = values + straight_through * (real - real.detach())
            if ternary_weight < 1:
                values = ternary_weight * values + (1 - ternary_weight) * real
        if map_mask is not None:
            values = values * map_mask.to(values.dtype)[:, :, None, None, None]
        return self.synthesis(values)

    @torch.no_grad()
    def encode(self, x: Tensor, k: int | None = None) -> Tensor:
        """Images (B,1,H,W) -> ternary code (B,m,n,h,w), int8."""
        k = k or self.config.k
        if not 1 <= k <= self.config.n // 2:
            raise ValueError(f"k={k} outside 1..{self.config.n // 2}")
        return self.ternarize(self.analysis(x), k)

    @torch.no_grad()
    def decode(self, t: Tensor) -> Tensor:
        """Ternary code (B,m,n,h,w) -> images (B,1,H,W) clamped to [0,1]."""
        return self.synthesis(self.magnitudes(t)).clamp(0, 1)
