"""The key coder's compiled loops: the formulas they name, bit for bit as array code does them."""

import os
import subprocess
import sys
from itertools import combinations

import numpy as np

from primis.keys import kernels


def elementary(values: list[float], degree: int) -> float:
    return float(sum(np.prod(c) for c in combinations(values, degree))) if degree else 1.0


def test_suffix_polynomials_are_the_elementary_symmetric_polynomials_of_each_suffix():
    rng = np.random.default_rng(0)
    weights = rng.integers(1, 5, size=(3, 7)).astype(np.float64)  # integers: exact sums
    sizes = np.array([3, 1, 2])
    table = kernels.suffix_polynomials(weights, sizes)
    assert table.shape == (3, 3, 8)
    for v, size in enumerate(sizes):
        for degree in range(size):
            for a in range(8):
                assert table[v, degree, a] == elementary(list(weights[v, a:]), degree)


def test_suffix_polynomials_add_in_the_order_the_keys_were_coded_in():
    """Keys coded by the array code before (each degree a cumsum from the last atom) decode
    only if every entry is the same float64, bit for bit."""
    rng = np.random.default_rng(1)
    weights = rng.lognormal(0.0, 3.0, size=(50, 256))
    sizes = np.full(50, 4)
    table = kernels.suffix_polynomials(weights, sizes)
    expected = np.empty_like(table)
    expected[:, 0] = 1.0
    expected[:, 1:, 256] = 0.0
    for degree in range(1, 4):
        terms = (weights * expected[:, degree - 1, 1:])[:, ::-1]
        expected[:, degree, :256] = np.cumsum(terms, axis=1)[:, ::-1]
    assert np.array_equal(table, expected)


def test_slot_probabilities_are_the_product_models_conditional_bit_for_bit():
    rng = np.random.default_rng(2)
    weights = rng.lognormal(0.0, 2.0, size=(6, 40))
    sizes = np.array([4, 3, 4, 2, 4, 3])
    table = kernels.suffix_polynomials(weights, sizes)
    # slot 1: summed over the first member, the conditional's normaliser is e_s of all atoms
    first = kernels.slot_probabilities(weights, table, np.arange(6), sizes, 1, np.empty(0, int))
    totals = [np.poly(-weights[v])[sizes[v]] for v in range(6)]  # prod(x + w): e_i at x^(n-i)
    assert np.allclose(first.sum(axis=1), totals, rtol=1e-9)
    rows, previous = np.array([0, 2, 4]), np.array([5, 0, 30])
    second = kernels.slot_probabilities(weights, table, rows, sizes[rows], 2, previous)
    after = np.arange(40)[None, :] > previous[:, None]
    expected = weights[rows] * table[rows, sizes[rows] - 2, 1:] * after
    assert np.array_equal(second, expected)
    assert np.all(second[~after] == 0) and np.all(second.sum(axis=1) > 0)


def test_coupling_products_multiply_float32_rows_in_float64_in_slot_order():
    rng = np.random.default_rng(3)
    factors = rng.lognormal(0.0, 1.0, size=(9, 16)).astype(np.float32)
    factors[8] = 1.0  # the padding row
    index = np.array([[0, 3, 8, 5], [8, 8, 8, 8], [7, 8, 2, 8]])
    product = kernels.coupling_products(factors, index, 8)
    expected = factors[index[:, 0]].astype(np.float64)
    for slot in range(1, 4):
        expected *= factors[index[:, slot]]
    assert product.dtype == np.float64
    assert np.array_equal(product, expected)


def test_the_loops_compile_where_no_cache_directory_can_be_written():
    """A read-only install with no writable home: numba finds nowhere to cache (simulated by
    allowing only the IPython locator), and the loops compile in the process instead."""
    code = (
        "import numpy as np\n"
        "from primis.keys import kernels\n"
        "print(kernels.suffix_polynomials(np.ones((1, 3)), np.array([3]))[0, 2, 0])"
    )
    env = {**os.environ, "NUMBA_CACHE_LOCATOR_CLASSES": "IPythonCacheLocator"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.stdout.strip() == "3.0", result.stderr  # e_2(1, 1, 1)
