"""The context key coder's inner loops, compiled (numba).

Each loop does the same float64 multiplications and additions in the same order as the formula
it names, one rounding per operation (numba contracts no multiply-add), so the encoder and the
decoder, on any CPU, compute bit-identical probabilities, equal to those of the array code that
came before them (keys coded then decode now). Compiled on first use and cached beside the
module, or in the user's cache directory where that is read-only; where neither can be written,
compiled in each process.
"""

from __future__ import annotations

from collections.abc import Callable

import numba
import numpy as np


def _compiled(function: Callable) -> Callable:
    """``function`` compiled, its machine code cached where numba finds a writable place."""
    try:
        return numba.njit(cache=True, nogil=True)(function)
    except RuntimeError:  # no cache directory can be written: compile in each process
        return numba.njit(nogil=True)(function)


@_compiled
def suffix_polynomials(weights: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """E (V, max(sizes), n+1): E[v, i, a] = e_i(weights[v, a:]), the elementary symmetric
    polynomial of degree i of the weights from atom a on, for the degrees i < sizes[v] that a
    set of sizes[v] members reads (the rest are left unset: nothing reads them). Each degree
    is summed from the last atom to the first: E[v, i, a] = E[v, i, a+1] + w_a E[v, i-1, a+1]."""
    v, n = weights.shape
    depth = 0
    for r in range(v):
        depth = max(depth, sizes[r])
    table = np.empty((v, depth, n + 1))
    for r in range(v):
        if depth > 0:
            table[r, 0, :] = 1.0
        for degree in range(1, depth):
            table[r, degree, n] = 0.0
        for degree in range(1, sizes[r]):
            total = 0.0
            for a in range(n - 1, -1, -1):
                total = total + weights[r, a] * table[r, degree - 1, a + 1]
                table[r, degree, a] = total
    return table


@_compiled
def slot_probabilities(
    weights: np.ndarray,
    table: np.ndarray,
    rows: np.ndarray,
    sizes: np.ndarray,
    slot: int,
    previous: np.ndarray,
) -> np.ndarray:
    """(len(rows), n): P(member ``slot`` (1-based) = a | the previous member) up to a factor,
    w_a * e_{s-slot}(w_{a+1}, ...), for the vectors ``rows`` of ``weights`` and of their
    suffix polynomials ``table``, whose sets have ``sizes`` >= ``slot`` members, the last one
    ``previous`` (read from slot 2 on): 0 for the atoms up to it (members ascend)."""
    n = weights.shape[1]
    p = np.empty((len(rows), n))
    for i in range(len(rows)):
        r, degree = rows[i], sizes[i] - slot
        first = previous[i] + 1 if slot > 1 else 0
        p[i, :first] = 0.0
        for a in range(first, n):
            p[i, a] = weights[r, a] * table[r, degree, a + 1]
    return p


@_compiled
def coupling_products(factors: np.ndarray, index: np.ndarray, ones: int) -> np.ndarray:
    """(R, n) float64: for each row of ``index`` (R, slots), the product of the float32 factor
    rows ``factors[index[r, 0]] * factors[index[r, 1]] * ...`` in float64, in slot order;
    the row ``ones`` (all factors 1, padding) is skipped, as multiplying by it changes nothing."""
    rows, slots = index.shape
    n = factors.shape[1]
    product = np.empty((rows, n))
    for r in range(rows):
        for a in range(n):
            product[r, a] = np.float64(factors[index[r, 0], a])
        for s in range(1, slots):
            b = index[r, s]
            if b != ones:
                for a in range(n):
                    product[r, a] *= factors[b, a]
    return product
