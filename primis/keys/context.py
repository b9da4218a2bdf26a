"""Context-coded keys: the true code vectors range coded under a fitted context model.

A code is coded vector by vector in order of anti-diagonals of its grid (all vectors with
row + column = d, of every map, form one stage; everything a stage's model looks at lies on
earlier stages, so a stage decodes as one batch). For each vector (map j, row r, column c):

1. with a variable rate, its count s in 0..k (it holds s entries +1 and s entries -1) under
   P(s | count of the vector above, count of the vector to the left);
2. its +1 atoms, then its -1 atoms, each set as ascending atom indices under the fixed-size
   product model P(S) ~ prod_{a in S} w[j, sign, ctx(a), a], where ctx(a) = 3 * sym(above, a)
   + sym(left, a) with sym 0, 1, 2 for an entry 0, +1, -1 (outside the grid: 0). Atoms the
   public vector rules out (``allowed``) get weight 0, and the -1 set excludes the +1 atoms.

A key model with couplings (`primis.keys.couplings`) also multiplies each weight by a factor
per atom already known: for the -1 set, per atom of the vector's own +1 set; in a map that
follows another, per atom of the previous map's vector at the same place, which is then coded
first (map p's vectors go p stages later).

Slot t of a set of size s takes atom a > (previous member) with probability proportional to
w_a * e_{s-t}(w_{a+1}, ..., w_{n-1}), e_i the elementary symmetric polynomial: exactly the
conditional of the product model. Only + and * of float64 enter the tables (no exp or log;
the loops in `primis.keys.kernels`), so encoder and decoder compute bit-identical probabilities
on any CPU, and constriction quantises them the same way everywhere. A key holds the atom
orders of the shuffled maps first, packed as enumerative keys pack them
(`primis.keys.enumerative`), then the range code.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING

import constriction
import numpy as np

from primis.errors import PrimisError
from primis.keys.enumerative import (
    pack_digits,
    packed_size,
    permutation_digits,
    permutation_from_digits,
    permutation_radices,
    unpack_digits,
)
from primis.obfuscation import allowed_atoms, unshuffle_atoms

if TYPE_CHECKING:
    from primis.keys import KeySpec

CONTEXTS = 9  # 3 symbols above x 3 symbols to the left
TENSORS = (
    "key_model.atom_weights",
    "key_model.count_weights",
    "key_model.pair_weights",  # optional: the couplings
    "key_model.cross_weights",
)
_FAMILY = constriction.stream.model.Categorical(perfect=False)
# Vectors whose coding tables are computed at a time: they stay in the CPU's cache.
CODING_CHUNK = 256
# Vectors whose atom costs are computed at a time (float32 work arrays).
COSTS_CHUNK = 2048


@dataclass(frozen=True)
class KeyModel:
    """Weights of the context model: ``atom_weights`` (m, 2 signs, 9 contexts, n) and
    ``count_weights`` (m, (k+1)**2 contexts, k+1); optionally the couplings, factors on an
    atom's weight: ``pair_weights`` (m, n, n), [j, b, a] for atom a in map j's -1 set where
    atom b is in the same vector's +1 set, and ``cross_weights`` (m-1, 2 signs, 2 signs, n,
    n), [j-1, sign, sign', b, a] for atom a holding sign in map j's vector where map j-1's
    vector at the same place holds atom b with sign'. All positive and finite."""

    atom_weights: np.ndarray
    count_weights: np.ndarray
    pair_weights: np.ndarray | None = None
    cross_weights: np.ndarray | None = None

    def __post_init__(self) -> None:
        a, c = self.atom_weights, self.count_weights
        if a.ndim != 4 or a.shape[1:3] != (2, CONTEXTS) or c.ndim != 3 or c.shape[0] != a.shape[0]:
            raise PrimisError("key model: tables of the wrong shape")
        if c.shape[1] != c.shape[2] ** 2:
            raise PrimisError("key model: count table of the wrong shape")
        m, n = a.shape[0], a.shape[3]
        if (self.pair_weights is None) != (self.cross_weights is None):
            raise PrimisError("key model: couplings need both tables")
        if self.pair_weights is not None and (
            self.pair_weights.shape != (m, n, n) or self.cross_weights.shape != (m - 1, 2, 2, n, n)
        ):
            raise PrimisError("key model: coupling tables of the wrong shape")
        for table in (a, c, self.pair_weights, self.cross_weights):
            if table is not None and not (np.all(np.isfinite(table)) and np.all(table > 0)):
                raise PrimisError("key model: weights must be positive and finite")

    @property
    def k(self) -> int:
        return self.count_weights.shape[2] - 1

    @property
    def coupled(self) -> bool:
        """Whether atoms' weights also follow the vector's own +1 atoms and the previous map."""
        return self.pair_weights is not None

    def fits(self, m: int, n: int, k: int) -> bool:
        """Whether it models codes of ``m`` maps of ``n`` atoms with up to ``k`` pairs."""
        return self.atom_weights.shape[0] == m and self.atom_weights.shape[3] == n and self.k == k

    def tensors(self) -> dict[str, np.ndarray]:
        return {name: t for name, t in zip(TENSORS, self.tables(), strict=True) if t is not None}

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray]) -> KeyModel:
        return cls(
            *(
                np.asarray(tensors[name], dtype=np.float32) if name in tensors else None
                for name in TENSORS
            )
        )

    def widened(self) -> KeyModel:
        """The same model in float64, the precision keys are coded in."""
        return KeyModel(*(None if t is None else t.astype(np.float64) for t in self.tables()))

    def tables(self) -> tuple[np.ndarray | None, ...]:
        """Every table, in `TENSORS` order (None for couplings it has not)."""
        return self.atom_weights, self.count_weights, self.pair_weights, self.cross_weights

    @functools.cached_property
    def coupling_rows(self) -> np.ndarray:
        """The couplings as one table of rows of n factors: map j's pair rows at j * n + b,
        then the cross rows at m * n + ((j-1) * 4 + 2 sign + sign') * n + b, then a row of ones."""
        n = self.atom_weights.shape[3]
        parts = (self.pair_weights.reshape(-1, n), self.cross_weights.reshape(-1, n))
        # float32, as stored (exactly): half the memory traffic of gathering float64
        return np.concatenate([*parts, np.ones((1, n))]).astype(np.float32)


def _symbols(vectors: np.ndarray) -> np.ndarray:
    """Entries -1, 0, +1 as the context symbols 2, 0, 1."""
    return np.where(vectors < 0, 2, vectors).astype(np.int64)


# The context of an atom whose entries above and to the left are a and l (each -1, 0 or +1),
# at index 3 * a + l + 4: 3 * sym(a) + sym(l).
_CONTEXT_OF_ENTRIES = np.array([3 * (a % 3) + (b % 3) for a in (-1, 0, 1) for b in (-1, 0, 1)])


def _atom_contexts(vectors: np.ndarray, above: np.ndarray, left: np.ndarray) -> np.ndarray:
    """(len(above), n): each atom's context, 3 * sym(above) + sym(left), 0 outside the grid."""
    entries = _gather(vectors, above, 0).astype(np.int8, copy=False) * np.int8(3)
    entries += _gather(vectors, left, 0).astype(np.int8, copy=False)
    entries += np.int8(4)
    return _CONTEXT_OF_ENTRIES.take(entries)


def _count_contexts(sizes: np.ndarray, above: np.ndarray, left: np.ndarray, k: int) -> np.ndarray:
    """Each vector's count context (k + 1) * s(above) + s(left), counting k outside the grid."""
    return _gather(sizes, above, k) * (k + 1) + _gather(sizes, left, k)


def _neighbours(m: int, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """For each vector (map-major, then rows, then columns): the index of the vector above and
    of the one to the left, -1 outside the grid."""
    rows, cols = grid
    r, c = np.divmod(np.arange(rows * cols), cols)
    index = np.arange(m * rows * cols)
    above = np.where(np.tile(r, m) > 0, index - cols, -1)
    left = np.where(np.tile(c, m) > 0, index - 1, -1)
    return above, left


def _stages(m: int, grid: tuple[int, int], shifted: bool = False) -> list[np.ndarray]:
    """Vector indices per anti-diagonal stage, map-major, rows ascending within a map;
    ``shifted``: the p-th map's vectors one stage later than the (p-1)-th's (so a vector
    follows the previous map's at its place), else all maps together."""
    rows, cols = grid
    r, c = np.divmod(np.arange(rows * cols), cols)
    index = np.arange(m * rows * cols).reshape(m, rows * cols)
    order = np.argsort(r + c, kind="stable")
    bounds = np.cumsum(np.bincount((r + c)[order], minlength=rows + cols - 1))[:-1]
    diagonals = np.split(order, bounds)
    if not shifted:
        return [index[:, part].reshape(-1) for part in diagonals]
    return [
        np.concatenate(
            [index[p, diagonals[d - p]] for p in range(m) if 0 <= d - p < len(diagonals)]
        )
        for d in range(len(diagonals) + m - 1)
    ]


def _gather(values: np.ndarray, index: np.ndarray, outside) -> np.ndarray:
    """``values[index]`` with ``outside`` where index is -1."""
    picked = values[np.maximum(index, 0)]  # a copy
    picked[index < 0] = outside
    return picked


def _suffix_polynomials(weights: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """E (V, max(sizes), n+1): E[v, i, a] = e_i(weights[v, a:]) for the degrees i < sizes[v]
    (`kernels.suffix_polynomials`)."""
    from primis.keys import kernels  # not at import: `primis info` answers without compiling

    return kernels.suffix_polynomials(weights, sizes)


def _rows_where(condition: np.ndarray) -> np.ndarray | slice:
    """The indices where ``condition`` holds; a slice (no copies when indexing) where it
    holds everywhere."""
    return slice(None) if np.count_nonzero(condition) == len(condition) else condition.nonzero()[0]


def _check_k(k: int, model: KeyModel) -> None:
    if not 1 <= k <= model.k:
        raise PrimisError(f"the key model codes up to {model.k} pairs per vector, not {k}")


class _Stage:
    """The model's tables for one stage's vectors ``index``, given what earlier stages hold:
    the counts' (``count_table``) and, for the vectors that hold atoms, the atoms'
    (`atom_weights`)."""

    def __init__(self, model: KeyModel, counts: np.ndarray, index, maps, ctx) -> None:
        self.model = model
        self.above, self.left, self.previous = (neighbour[index] for neighbour in ctx)
        self.maps = maps[index]
        count_context = _count_contexts(counts, self.above, self.left, model.k)
        self.count_table = model.count_weights[self.maps, count_context]

    def atom_weights(self, done: np.ndarray, rows: np.ndarray | slice) -> np.ndarray:
        """(2, len(rows), n): each atom's weight for +1 (``[0]``) and -1 (``[1]``) in the
        stage's vectors ``rows``, in the contexts the vectors ``done`` give them (with
        couplings: times the factors of the previous map's atoms at its place, `_couple`)."""
        context = _atom_contexts(done, self.above[rows], self.left[rows])
        n = context.shape[1]
        # Where each weight lies in the flat table (m, 2 signs, 9 contexts, n), sign +1.
        cells = context * n
        cells += self.maps[rows, None] * (2 * CONTEXTS * n) + np.arange(n)
        flat = self.model.atom_weights.reshape(-1)
        weights = np.empty((2, *cells.shape), dtype=flat.dtype)
        flat.take(cells, out=weights[0])
        cells += CONTEXTS * n
        flat.take(cells, out=weights[1])
        if self.model.coupled:
            self._cross(weights, done, np.arange(len(self.maps))[rows])
        return weights

    def _cross(self, weights: np.ndarray, done: np.ndarray, rows: np.ndarray) -> None:
        """Multiply in the cross-map factors of the vectors of ``rows`` that follow the
        previous map's: those of that vector's +1 atoms, then of its -1 atoms."""
        has = np.nonzero(self.previous[rows] >= 0)[0]
        if len(has) == 0:
            return
        earlier = done[self.previous[rows[has]]]
        k, n = self.model.k, earlier.shape[1]
        members = np.concatenate(
            [
                _members(earlier, sign, np.count_nonzero(earlier == sign, axis=1), k)
                for sign in (1, -1)
            ],
            axis=1,
        )
        first = self.model.atom_weights.shape[0] * n + (self.maps[rows[has]] - 1) * 4 * n
        source = np.repeat([0, n], k)  # +1 members, then -1 members
        offset = first[None, :, None] + (2 * n * np.arange(2))[:, None, None] + source
        _couple(weights, has, members, offset, self.model)  # both signs' weights at once

    def pair(self, weights: np.ndarray, rows: np.ndarray | slice, plus: np.ndarray) -> None:
        """Multiply in the -1 set's pair factors (with couplings): for each vector of ``rows``
        (its -1 weights ``weights``), its +1 atoms ``plus`` (ascending, padded with -1)."""
        if self.model.coupled:
            n = weights.shape[1]
            offset = (self.maps[rows] * n)[:, None]
            _couple(weights, slice(None), plus, offset, self.model)


def _couple(weights: np.ndarray, rows, members: np.ndarray, offset, model: KeyModel) -> None:
    """``weights[..., rows, :]`` times the product, over the atoms b of ``members`` (R, slots;
    padded with -1) in order, of the coupling rows ``offset + b`` (`KeyModel.coupling_rows`;
    ``offset`` broadcasts to (..., R, slots)): one computation, shared by the encoder and the
    decoder, so that both get bit-identical weights."""
    from primis.keys import kernels

    table = model.coupling_rows
    index = np.where(members >= 0, offset + members, len(table) - 1)  # the last row: ones
    flat = np.ascontiguousarray(index.reshape(-1, index.shape[-1]))
    product = kernels.coupling_products(table, flat, len(table) - 1)
    weights[..., rows, :] *= product.reshape(*index.shape[:-1], table.shape[1])


def _slot_probabilities(
    weights: np.ndarray,
    table: np.ndarray,
    rows: np.ndarray | slice,
    sizes: np.ndarray,
    slot: int,
    previous: np.ndarray | None,
) -> np.ndarray:
    """P(member ``slot`` (1-based) = a | the previous member) for the vectors ``rows`` of
    ``weights`` and of their suffix polynomials ``table``, whose sets have ``sizes`` >=
    ``slot`` members, the last one ``previous`` (None for the first); up to a factor
    (`kernels.slot_probabilities`)."""
    from primis.keys import kernels

    rows = np.arange(len(weights)) if isinstance(rows, slice) else rows
    previous = _NO_MEMBERS if previous is None else np.ascontiguousarray(previous)
    return kernels.slot_probabilities(weights, table, rows, sizes, slot, previous)


_NO_MEMBERS = np.empty(0, dtype=np.int64)


def _members(vectors: np.ndarray, sign: int, sizes: np.ndarray, k: int) -> np.ndarray:
    """(V, k): the atoms holding ``sign`` in ascending order, padded with -1 (``sizes``: how
    many each vector holds). Memory follows the members, not V * n indices."""
    rows, atoms = np.divmod(np.flatnonzero(vectors == sign), vectors.shape[1])  # ascending
    members = np.full((len(vectors), k), -1, dtype=np.int64)
    first = np.cumsum(sizes) - sizes  # where each row's atoms start in ``atoms``
    members[rows, np.arange(len(rows)) - first[rows]] = atoms
    return members


def _layout(m_of: list[int], grid: tuple[int, int], coupled: bool = False):
    """For the vectors of the maps ``m_of`` (map-major): each one's map, its neighbours (the
    vector above, the one to the left and, ``coupled``, the previous map's at its place where
    that map is coded too; -1 where there is none) and the stages (`_stages`)."""
    maps = np.repeat(np.asarray(m_of, dtype=np.int64), grid[0] * grid[1])
    previous = _previous_map(m_of, grid) if coupled else np.full(len(maps), -1)
    return maps, (*_neighbours(len(m_of), grid), previous), _stages(len(m_of), grid, coupled)


def _previous_map(m_of: list[int], grid: tuple[int, int]) -> np.ndarray:
    """For each vector of the maps ``m_of`` (map-major): the index of the previous map's vector
    at its place, where the map just before it is among ``m_of`` too; else -1."""
    cells = grid[0] * grid[1]
    follows = np.repeat([p > 0 and m_of[p] == m_of[p - 1] + 1 for p in range(len(m_of))], cells)
    return np.where(follows, np.arange(len(m_of) * cells) - cells, -1)


def _coding_order(
    shape: tuple[int, int],
    maps: list[int],
    grid: tuple[int, int],
    k: int,
    model: KeyModel,
    allowed: np.ndarray | None,
):
    """For a code of ``shape`` (V, n) coded at ``k`` under ``model``: the atoms allowed (None
    where all are) and the layout (`_layout`); PrimisError where the model codes fewer pairs."""
    _check_k(k, model)
    allowed = None if allowed is None or allowed.all() else allowed
    return allowed, *_layout(maps, grid, model.coupled)


class _Decoder:
    """Reads the symbols back (see `_walk`); data the model cannot have produced raises
    PrimisError (constriction reports it as an AssertionError)."""

    def __init__(self, data: bytes) -> None:
        if len(data) % 4:
            raise PrimisError("key payload is corrupted (not whole 32-bit words)")
        words = np.frombuffer(data, dtype="<u4").astype(np.uint32)
        self.coder = constriction.stream.queue.RangeDecoder(words)

    def _read(self, probabilities: np.ndarray) -> np.ndarray:
        try:
            return self.coder.decode(_FAMILY, probabilities).astype(np.int64)
        except (AssertionError, ValueError, RuntimeError):
            raise PrimisError("key payload is corrupted (invalid range code)") from None

    def counts(self, index: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
        return self._read(probabilities)

    def atoms(self, index, part: int, slot: int, probabilities: np.ndarray) -> np.ndarray:
        chosen = self._read(probabilities)
        if np.any(probabilities[np.arange(len(index)), chosen] <= 0):
            raise PrimisError("key payload is corrupted (impossible code entry)")
        return chosen


def _walk(
    coder: _Decoder,
    vectors: np.ndarray,
    sizes: np.ndarray,
    maps: list[int],
    grid: tuple[int, int],
    k: int,
    wide: KeyModel,
    allowed: np.ndarray | None,
    variable: bool,
) -> None:
    """Read every symbol of the code in coding order into ``vectors`` and ``sizes``, stage by
    stage (what a stage's model looks at was read on earlier stages), under the model ``wide``
    in float64."""
    n = vectors.shape[1]
    allowed, map_of, ctx, stages = _coding_order(vectors.shape, maps, grid, k, wide, allowed)
    for index in stages:
        stage = _Stage(wide, sizes, index, map_of, ctx)
        if variable:
            sizes[index] = coder.counts(index, np.ascontiguousarray(stage.count_table[:, : k + 1]))
        rows_of = np.nonzero(sizes[index] > 0)[0]  # the tables cover only vectors that hold atoms
        held = index[rows_of]
        taken = np.zeros((len(held), n), dtype=bool)
        both = stage.atom_weights(vectors, rows_of)
        for part, sign in enumerate((1, -1)):
            weights = both[part]
            if allowed is not None:
                weights *= allowed[held, part]
            if part:  # the -1 set excludes the +1 atoms, and follows them with couplings
                weights *= ~taken
                stage.pair(weights, rows_of, _members(vectors[held], 1, sizes[held], k))
            table = _suffix_polynomials(weights, sizes[held])
            previous = np.full(len(held), -1)
            for slot in range(1, k + 1):
                holding = sizes[held] >= slot
                if not holding.any():
                    break
                rows = _rows_where(holding)
                p = _slot_probabilities(
                    weights, table, rows, sizes[held[rows]], slot, previous[rows]
                )
                chosen = coder.atoms(held[rows], part, slot, p)
                previous[rows] = chosen
                taken[np.arange(len(held))[rows], chosen] = True
                vectors[held[rows], chosen] = sign


def _symbols_in_order(
    vectors: np.ndarray,
    maps: list[int],
    grid: tuple[int, int],
    k: int,
    wide: KeyModel,
    allowed: np.ndarray | None,
    variable: bool,
    chunk: int = CODING_CHUNK,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The code's symbols in the order `_walk` reads them under the model ``wide`` in float64,
    in batches of the tables of about ``chunk`` vectors: the vectors they belong to, the
    symbols (int32) and each one's probabilities over its alphabet (float64, up to a factor),
    which the decoder computes bit for bit the same (see `ContextKeyCoder.encode_vectors`)."""
    sizes = np.count_nonzero(vectors > 0, axis=1)
    if np.any(sizes != np.count_nonzero(vectors < 0, axis=1)) or np.any(sizes > k):
        raise ValueError(f"every vector must hold s <= {k} entries +1 and as many -1")
    if not variable and np.any(sizes != k):
        raise ValueError(f"every vector must hold exactly {k} entries +1 and {k} entries -1")
    allowed, map_of, ctx, stages = _coding_order(vectors.shape, maps, grid, k, wide, allowed)
    members = [_members(vectors, sign, sizes, k) for sign in (1, -1)]
    for group in _stage_groups(stages, chunk):
        # The code is known, so the tables of many stages are computed together; the symbols
        # then go out in the order `_walk` reads them, with the same float64 probabilities.
        index = np.concatenate(group)
        stage = _Stage(wide, sizes, index, map_of, ctx)
        rows_of = np.nonzero(sizes[index] > 0)[0]  # the tables cover only vectors that hold atoms
        held = index[rows_of]
        slots = []  # per part and slot: the rows (ascending), their atoms and probabilities
        both = stage.atom_weights(vectors, rows_of)
        for part in (0, 1):
            weights = both[part]
            if allowed is not None:
                weights *= allowed[held, part]
            if part:  # the -1 set excludes the +1 atoms, and follows them with couplings
                weights *= vectors[held] <= 0
                stage.pair(weights, rows_of, members[0][held])
            table = _suffix_polynomials(weights, sizes[held])
            for slot in range(1, k + 1):
                rows = _rows_where(sizes[held] >= slot)
                atoms = members[part][held[rows]]
                previous = atoms[:, slot - 2] if slot > 1 else None
                p = _slot_probabilities(weights, table, rows, sizes[held[rows]], slot, previous)
                chosen = atoms[:, slot - 1].astype(np.int32)
                if np.any(p[np.arange(len(atoms)), chosen] <= 0):
                    raise ValueError("a code entry lies where the public vector rules it out")
                slots.append((rows_of[rows], chosen, p))
        bounds = np.cumsum([0] + [len(part) for part in group])
        cuts = [np.searchsorted(rows, bounds).tolist() for rows, _, _ in slots]
        for stage_of_group, (low, high) in enumerate(pairwise(bounds)):
            if variable:
                counts = np.ascontiguousarray(stage.count_table[low:high, : k + 1])
                yield index[low:high], sizes[index[low:high]].astype(np.int32), counts
            for (rows, chosen, p), cut in zip(slots, cuts, strict=True):
                first, last = cut[stage_of_group], cut[stage_of_group + 1]
                yield index[rows[first:last]], chosen[first:last], p[first:last]


def _stage_groups(stages: list[np.ndarray], chunk: int) -> list[list[np.ndarray]]:
    """Consecutive stages in groups of at most ``chunk`` vectors (or one stage)."""
    groups, size = [], 0
    for stage in stages:
        if not groups or size + len(stage) > chunk:
            groups.append([])
            size = 0
        groups[-1].append(stage)
        size += len(stage)
    return groups


def most_probable_code(
    model: KeyModel, grid: tuple[int, int], k: int, allowed: np.ndarray
) -> np.ndarray:
    """A code of every map (m * rows * cols vectors, k entries +1 and k entries -1 each) that
    the model finds likely, where ``allowed`` (V, 2, n) marks the atoms each vector's +1 and -1
    entries may take: stage by stage in coding order, each vector's most probable +1 set (the k
    allowed atoms of largest weight in their context, which maximises the product model), then
    its -1 set among the rest. Greedy over stages, exact within a vector; an attacker's guess
    of the support from a prior over codes (`primis.attacks`)."""
    _check_k(k, model)
    v, _, n = allowed.shape
    m = model.atom_weights.shape[0]
    vectors = np.zeros((v, n), dtype=np.int8)
    map_of, ctx, stages = _layout(list(range(m)), grid, model.coupled)
    counts = np.full(v, k)
    for index in stages:
        stage = _Stage(model, counts, index, map_of, ctx)
        both = stage.atom_weights(vectors, slice(None))
        taken = np.zeros((len(index), n), dtype=bool)
        plus = np.empty((len(index), 0), dtype=np.int64)  # the +1 atoms, once chosen
        for part, sign in enumerate((1, -1)):
            if part:
                stage.pair(both[1], slice(None), plus)
            weights = np.where(allowed[index, part] & ~taken, both[part], -1.0)
            chosen = np.argsort(-weights, axis=1, kind="stable")[:, :k]
            plus = np.sort(chosen, axis=1)
            rows = np.repeat(np.arange(len(index)), k)
            taken[rows, chosen.reshape(-1)] = True
            vectors[index[rows], chosen.reshape(-1)] = sign
    return vectors


def fit_key_model(
    codes: Iterable[tuple[np.ndarray, tuple[int, int]]],
    k: int,
    prior: float = 1.0,
    couplings: bool = False,
) -> KeyModel:
    """The context model fitted to ternary codes, each given as its vectors (m * rows * cols,
    n) int8 in `obfuscation.code_to_vectors` order and its grid (rows, cols), by counting: an
    atom's weight in a context is its odds of holding each sign there (counts plus ``prior``),
    and the count table is the frequency of each count given its neighbours'. With
    ``couplings`` the atom weights are then refitted together with the couplings on vectors
    sampled from the codes (`primis.keys.couplings`): smaller keys, coded in somewhat more
    time."""
    from primis.keys.couplings import CouplingSamples, fit_couplings

    samples = CouplingSamples()
    atom_hits = atom_totals = count_hits = None
    for vectors, (rows, cols) in codes:
        n = vectors.shape[1]
        m = len(vectors) // (rows * cols)
        maps = np.repeat(np.arange(m), rows * cols)
        above, left = _neighbours(m, (rows, cols))
        context = _atom_contexts(vectors, above, left)  # (V, n)
        if couplings:
            samples.add(vectors, context, maps, _previous_map(list(range(m)), (rows, cols)))
        cell = (maps[:, None] * CONTEXTS + context) * n + np.arange(n)[None, :]
        sizes = np.count_nonzero(vectors > 0, axis=1)
        count_context = _count_contexts(sizes, above, left, k)
        if atom_hits is None:
            atom_hits = np.zeros((2, m * CONTEXTS * n))
            atom_totals = np.zeros(m * CONTEXTS * n)
            count_hits = np.zeros((m, (k + 1) ** 2, k + 1))
        atom_totals += np.bincount(cell.ravel(), minlength=atom_totals.size)
        for part, sign in enumerate((1, -1)):
            atom_hits[part] += np.bincount(cell[vectors == sign], minlength=atom_totals.size)
        np.add.at(count_hits, (maps, count_context, sizes), 1)
    if atom_hits is None:
        raise PrimisError("no codes to fit a key model to")
    m = count_hits.shape[0]
    hits = atom_hits + prior
    odds = hits / (atom_totals - atom_hits + prior)
    atom_weights = odds.reshape(2, m, CONTEXTS, -1).transpose(1, 0, 2, 3)
    counted = KeyModel(
        np.ascontiguousarray(atom_weights, dtype=np.float32),
        (count_hits + prior).astype(np.float32),
    )
    return fit_couplings(samples, counted) if couplings else counted


class ContextKeyCoder:
    """Keys range coded under a model's key model. The coding tables (the weights in float64,
    the atoms' bits) are built once, when the coder is made."""

    coding = "context"
    codes_counts = True

    def __init__(self, model: KeyModel) -> None:
        self.model = model
        self._wide = model.widened()
        self._atom_bits = -np.log2(model.atom_weights.astype(np.float32))  # (m, 2, 9, n)

    def encode(
        self, code: np.ndarray, public: np.ndarray, perms: list[np.ndarray | None], spec: KeySpec
    ) -> bytes:
        """The atom orders of the shuffled maps, then the range-coded code (see
        `KeyCoder.encode`)."""
        digits = [d for perm in perms if perm is not None for d in permutation_digits(perm)]
        shuffled = sum(perm is not None for perm in perms)
        radices = permutation_radices(code.shape[1], shuffled)
        order = pack_digits(np.array(digits, dtype=object), radices)
        allowed = allowed_atoms(public, spec.mask_signs)
        return order + self.encode_vectors(
            code, list(spec.maps), spec.grid, spec.k, allowed, spec.variable
        )

    def decode(self, payload: bytes, shown: np.ndarray, spec: KeySpec) -> np.ndarray:
        """Inverse of `encode` (see `KeyCoder.decode`)."""
        n = shown.shape[1]
        radices = permutation_radices(n, len(spec.maps) if spec.permuted else 0)
        used = packed_size(radices)
        if len(payload) < used:
            raise PrimisError(f"key payload has {len(payload)} bytes, expected at least {used}")
        digits = unpack_digits(payload[:used], radices)
        public = shown
        if spec.permuted:
            public = np.concatenate(
                [
                    unshuffle_atoms(part, permutation_from_digits(digits[i * n : (i + 1) * n]))
                    for i, part in enumerate(np.split(shown, len(spec.maps)))
                ]
            )
        allowed = allowed_atoms(public, spec.mask_signs)
        return self.decode_vectors(
            payload[used:], list(spec.maps), spec.grid, n, spec.k, allowed, spec.variable
        )

    def information(self, payload: bytes, public: np.ndarray, spec: KeySpec) -> float:
        """The payload's size in bits: range coding leaves no slack worth counting apart."""
        return 8.0 * len(payload)

    def encode_vectors(
        self,
        vectors: np.ndarray,
        maps: list[int],
        grid: tuple[int, int],
        k: int,
        allowed: np.ndarray | None = None,
        variable: bool = True,
        chunk: int = CODING_CHUNK,
    ) -> bytes:
        """Range-code the code vectors (len(maps) * rows * cols, n) of the maps ``maps`` (each
        vector s entries +1 and s entries -1, s <= k <= the model's k; s = k unless
        ``variable``). ``allowed`` (V, 2, n) marks the atoms each vector's +1 and -1 entries
        may take (all if None). Any ``chunk`` (vectors whose tables are computed at a time)
        writes the same bytes."""
        coder = constriction.stream.queue.RangeEncoder()
        for _, symbols, probabilities in _symbols_in_order(
            vectors, maps, grid, k, self._wide, allowed, variable, chunk
        ):
            coder.encode(symbols, _FAMILY, probabilities)
        return coder.get_compressed().astype("<u4").tobytes()

    def decode_vectors(
        self,
        data: bytes,
        maps: list[int],
        grid: tuple[int, int],
        n: int,
        k: int,
        allowed: np.ndarray | None = None,
        variable: bool = True,
    ) -> np.ndarray:
        """Inverse of `encode_vectors`: the vectors (len(maps) * rows * cols, n), int8. Data
        that does not decode to a valid code raises PrimisError."""
        decoder = _Decoder(data)
        v = len(maps) * grid[0] * grid[1]
        vectors = np.zeros((v, n), dtype=np.int8)
        sizes = np.full(v, k, dtype=np.int64)
        _walk(decoder, vectors, sizes, maps, grid, k, self._wide, allowed, variable)
        if not decoder.coder.maybe_exhausted():
            raise PrimisError("key payload is corrupted (data left after the code)")
        return vectors

    def vector_information(
        self,
        vectors: np.ndarray,
        maps: list[int],
        grid: tuple[int, int],
        k: int,
        allowed: np.ndarray | None = None,
        variable: bool = True,
    ) -> np.ndarray:
        """(V,) float64: the key bits each code vector takes (its count's and its atoms'
        information, -log2 of their probabilities as `encode_vectors` codes them; the coded
        size adds at most a few bytes to their sum). Where the key's rate goes in an image."""
        bits = np.zeros(len(vectors))
        for index, symbols, probabilities in _symbols_in_order(
            vectors, maps, grid, k, self._wide, allowed, variable
        ):
            chosen = probabilities[np.arange(len(index)), symbols]
            np.add.at(bits, index, -np.log2(chosen / probabilities.sum(axis=1)))
        return bits

    def atom_costs(
        self,
        vectors: np.ndarray,
        grid: tuple[int, int],
        scale: float = 1.0,
        dtype: type = np.float32,
        chunk: int = COSTS_CHUNK,
    ) -> np.ndarray:
        """(V, 2, n): about how many key bits each atom adds to a code of every map (vectors
        (m * rows * cols, n) in coding order) by holding +1 (``[:, 0]``) or -1 (``[:, 1]``) in
        its vector, the rest of the code as it is: its own term under the context of the
        vectors above and to the left, plus what it changes in the terms of the atoms the
        vectors below and to the right hold (the product model's normalisers are left out).
        The rate that rate-distortion optimised coding (`primis.sharing`) weighs against
        distortion.

        Each ``chunk`` of vectors is computed in float32 and stored times ``scale`` as
        ``dtype`` (float16 halves a large image's memory; values beyond its range are
        clipped)."""
        bits = self._atom_bits
        m, n = bits.shape[0], bits.shape[3]
        map_of, (above, left, _), _ = _layout(list(range(m)), grid)
        below, right = np.full(len(vectors), -1), np.full(len(vectors), -1)
        below[above[above >= 0]] = np.nonzero(above >= 0)[0]
        right[left[left >= 0]] = np.nonzero(left >= 0)[0]
        atoms = np.arange(n)[None, :]
        costs = np.empty((len(vectors), 2, n), dtype=dtype)
        largest = np.finfo(dtype).max
        for start in range(0, len(vectors), chunk):
            part = slice(start, start + chunk)
            j = map_of[part][:, None]
            context = 3 * _symbols(_gather(vectors, above[part], 0))
            context += _symbols(_gather(vectors, left[part], 0))
            own = np.stack([bits[j, sign, context, atoms] for sign in (0, 1)], axis=1)
            # A neighbour u after this vector reads it as its "above" (u below) or its "left"
            # (u to the right): the atoms u holds change context when this vector holds them.
            for after, weight_of_mine in ((below[part], 3), (right[part], 1)):
                held = _symbols(_gather(vectors, after, 0))  # u's own entries, 0 where no u
                other = left if weight_of_mine == 3 else above
                other_symbols = _symbols(_gather(vectors, _gather(other, after, -1), 0))
                base = other_symbols * (4 - weight_of_mine)  # 3 * above for u to the right
                u_sign = np.maximum(held - 1, 0)
                before = bits[j, u_sign, base, atoms]
                for sign in (0, 1):
                    changed = bits[j, u_sign, base + weight_of_mine * (sign + 1), atoms]
                    own[:, sign] += np.where(held > 0, changed - before, 0)
            costs[part] = np.clip(own * scale, -largest, largest)
        return costs
