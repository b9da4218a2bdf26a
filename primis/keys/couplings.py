"""Fitting a key model's couplings (`KeyModel.pair_weights`, `KeyModel.cross_weights`).

Each atom's weight in the context model is the odds that it holds a sign. The couplings make
those odds follow what the decoder already knows beyond the neighbours' same atom: the -1 set
follows the vector's own +1 atoms, and a map's vector follows the previous map's at its place.
The odds are fitted as a logistic model of each atom, log odds = log(context weight) + the sum
of the log factors of the atoms known, by gradient descent on the binary cross-entropy over
sampled code vectors; the tables store the factors themselves (exp of the log factors), so
coding multiplies and never takes exp or log (`primis.keys.context`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from primis.keys.context import KeyModel

# Vectors kept per image for the fit (at random), so that any number and size of images fits.
SAMPLES_PER_IMAGE = 1000
EPOCHS = 12
MIN_STEPS = 300  # per map: small samples get more passes
BATCH = 8192
LEARNING_RATE = 0.03
L2 = 1e-6
LOG_LIMIT = 20.0  # log factors and weights are kept within +-20 (finite, positive tables)


@dataclass
class CouplingSamples:
    """Code vectors that hold atoms, collected for `fit_couplings`: each one's entries, its
    atom contexts (0..8), its map and the previous map's vector at its place (zeros for map
    0)."""

    seed: int = 0
    vectors: list[np.ndarray] = field(default_factory=list)
    contexts: list[np.ndarray] = field(default_factory=list)
    maps: list[np.ndarray] = field(default_factory=list)
    previous: list[np.ndarray] = field(default_factory=list)

    def add(
        self, vectors: np.ndarray, contexts: np.ndarray, maps: np.ndarray, previous: np.ndarray
    ) -> None:
        """Keep up to `SAMPLES_PER_IMAGE` of one code's vectors that hold atoms (``previous``:
        each vector's previous-map vector index, -1 where none)."""
        rows = np.nonzero(np.any(vectors > 0, axis=1))[0]
        rng = np.random.default_rng([self.seed, len(self.vectors)])
        if len(rows) > SAMPLES_PER_IMAGE:
            rows = np.sort(rng.choice(rows, SAMPLES_PER_IMAGE, replace=False))
        before = previous[rows]
        earlier = np.where((before >= 0)[:, None], vectors[np.maximum(before, 0)], 0)
        self.vectors.append(vectors[rows].astype(np.int8))
        self.contexts.append(contexts[rows].astype(np.uint8))
        self.maps.append(maps[rows].astype(np.int64))
        self.previous.append(earlier.astype(np.int8))


def fit_couplings(samples: CouplingSamples, base: KeyModel, seed: int = 0) -> KeyModel:
    """``base`` with its atom weights refitted and couplings fitted to ``samples`` (see the
    module's docstring; the count table is kept). A tenth of the images is held out: the fit
    keeps the parameters that code their vectors best, and gives ``base`` back where no pass
    beats it (or where one image leaves none to hold out). Gradients are on here even where
    the caller runs without them."""
    import torch

    with torch.inference_mode(False), torch.enable_grad():
        return _fit(samples, base, seed)


def _fit(samples: CouplingSamples, base: KeyModel, seed: int) -> KeyModel:
    """`fit_couplings`, with gradients on."""
    import torch

    if not samples.vectors:
        raise ValueError("no code vectors that hold atoms to fit couplings to")
    data = _Data(samples, base)
    m, _, _, n = base.atom_weights.shape
    log_weights = torch.nn.Parameter(torch.from_numpy(np.log(base.atom_weights)).float())
    pair = torch.nn.Parameter(torch.zeros(m, n, n))
    cross = torch.nn.Parameter(torch.zeros(max(m - 1, 1), 2, 2, n, n))
    parameters = [log_weights, pair, cross]
    optimiser = torch.optim.Adam(parameters, lr=LEARNING_RATE)
    generator = torch.Generator().manual_seed(seed)
    longest = max(len(rows) for rows in data.training)
    if not any(len(rows) for rows in data.held_out):
        return base
    best, kept = data.held_out_loss(*parameters), None
    for _ in range(max(EPOCHS, -(-MIN_STEPS * BATCH // max(longest, 1)))):
        for j, rows_of_map in enumerate(data.training):
            order = rows_of_map[torch.randperm(len(rows_of_map), generator=generator)]
            for start in range(0, len(order), BATCH):
                loss = data.loss(j, order[start : start + BATCH], *parameters)
                loss = loss + L2 * ((pair[j] ** 2).sum() + (cross**2).sum())
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        held_out = data.held_out_loss(*parameters)
        if held_out < best:
            best, kept = held_out, [p.detach().clone() for p in parameters]
    if kept is None:
        return base

    def table(tensor: torch.Tensor) -> np.ndarray:
        return np.exp(tensor.clamp(-LOG_LIMIT, LOG_LIMIT).double().numpy()).astype(np.float32)

    return KeyModel(table(kept[0]), base.count_weights, table(kept[1]), table(kept[2])[: m - 1])


class _Data:
    """The samples as tensors, split into training and held-out vectors per map."""

    def __init__(self, samples: CouplingSamples, base: KeyModel) -> None:
        import torch

        self.vectors = torch.from_numpy(np.concatenate(samples.vectors))
        self.contexts = torch.from_numpy(np.concatenate(samples.contexts).astype(np.int64))
        self.previous = torch.from_numpy(np.concatenate(samples.previous))
        self.atoms = torch.arange(base.atom_weights.shape[3])
        maps = torch.from_numpy(np.concatenate(samples.maps))
        images = len(samples.vectors)  # every tenth image held out, at least one
        chosen = {i for i in range(images) if i % 10 == 9}
        chosen = chosen or ({images - 1} if images > 1 else set())
        held = torch.from_numpy(
            np.concatenate([np.full(len(v), i in chosen) for i, v in enumerate(samples.vectors)])
        )
        self.training, self.held_out = (
            [torch.nonzero((maps == j) & part)[:, 0] for j in range(base.atom_weights.shape[0])]
            for part in (~held, held)
        )

    def loss(self, j: int, rows, log_weights, pair, cross):
        """Mean binary cross-entropy of the +1 and the -1 sets of map j's vectors ``rows``."""
        import torch

        v, earlier = self.vectors[rows], self.previous[rows]
        plus, minus = (v > 0).float(), (v < 0).float()
        logits = log_weights[j][:, self.contexts[rows], self.atoms]  # (2, B, n)
        logits = logits + torch.stack([torch.zeros_like(plus), plus @ pair[j]])
        if j > 0:
            above_zero, below_zero = (earlier > 0).float(), (earlier < 0).float()
            logits = logits + torch.stack(
                [
                    above_zero @ cross[j - 1, part, 0] + below_zero @ cross[j - 1, part, 1]
                    for part in (0, 1)
                ]
            )
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        # the -1 set excludes the +1 atoms
        return bce(logits[0], plus) + bce(logits[1], minus, weight=1.0 - plus)

    def held_out_loss(self, *parameters) -> float:
        """The loss over every held-out vector (a sum over maps, each weighted by its share)."""
        import torch

        total = sum(len(rows) for rows in self.held_out)
        with torch.no_grad():
            return sum(
                float(self.loss(j, rows, *parameters)) * len(rows) / total
                for j, rows in enumerate(self.held_out)
                if len(rows)
            )
