"""The linear-recurrence module against plain Python loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parallel_rnn._scan import (
    dense_recurrence,
    diagonal_recurrence,
    prefix_sum,
    transposed_recurrence,
)

from .helpers import dense_bidiagonal


T, D = 37, 3  # odd T exercises the odd/even split of the associative scan


def _loop(A, b, reverse, dense):
    A, b = np.asarray(A), np.asarray(b)
    x = np.zeros(b.shape[1])
    out = np.zeros_like(b)
    order = range(T - 1, -1, -1) if reverse else range(T)
    for t in order:
        x = (A[t] @ x if dense else A[t] * x) + b[t]
        out[t] = x
    return out


@pytest.mark.parametrize("width", [D, 40], ids=["small", "wide"])  # two matvec forms
@pytest.mark.parametrize("method", ["associative", "sequential"])
@pytest.mark.parametrize("reverse", [False, True])
def test_dense_recurrence_matches_loop(method, reverse, width):
    kA, kb = jax.random.split(jax.random.key(0))
    A = (0.9 / width**0.5) * jax.random.normal(kA, (T, width, width), jnp.float64)
    b = jax.random.normal(kb, (T, width), jnp.float64)
    got = dense_recurrence(A, b, reverse=reverse, method=method)
    np.testing.assert_allclose(got, _loop(A, b, reverse, True), rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("width", [D, 40], ids=["small", "wide"])
@pytest.mark.parametrize("method", ["associative", "sequential"])
def test_transposed_recurrence_solves_the_adjoint_system(method, width):
    # Oracle: the block-bidiagonal system (I - shifted Aᵀ) x = b, solved densely.
    kA, kb = jax.random.split(jax.random.key(5))
    A = (0.9 / width**0.5) * jax.random.normal(kA, (T, width, width), jnp.float64)
    b = jax.random.normal(kb, (T, width), jnp.float64)
    M = dense_bidiagonal(A).T  # x_t - A_{t+1}ᵀ x_{t+1} = b_t
    exact = np.linalg.solve(M, np.asarray(b).ravel()).reshape(T, width)
    got = transposed_recurrence(A, b, method=method)
    np.testing.assert_allclose(got, exact, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["associative", "sequential"])
@pytest.mark.parametrize("reverse", [False, True])
def test_diagonal_recurrence_matches_loop(method, reverse):
    ka, kb = jax.random.split(jax.random.key(1))
    a = jax.random.uniform(ka, (T, D), jnp.float64, -1.2, 1.2)
    b = jax.random.normal(kb, (T, D), jnp.float64)
    got = diagonal_recurrence(a, b, reverse=reverse, method=method)
    np.testing.assert_allclose(got, _loop(a, b, reverse, False), rtol=1e-12, atol=1e-12)


def test_dense_equals_diagonal_on_diagonal_matrices():
    ka, kb = jax.random.split(jax.random.key(2))
    a = jax.random.uniform(ka, (T, D), jnp.float64, -1, 1)
    b = jax.random.normal(kb, (T, D), jnp.float64)
    A = jax.vmap(jnp.diag)(a)
    np.testing.assert_allclose(
        dense_recurrence(A, b, method="associative"),
        diagonal_recurrence(a, b, method="associative"),
        rtol=1e-12,
        atol=1e-12,
    )


def test_dense_associative_keeps_float32_precision():
    # A chain of matmuls at TF32 would lose ~3 digits; HIGHEST keeps ~1e-6.
    kA, kb = jax.random.split(jax.random.key(3))
    A = 0.3 * jax.random.normal(kA, (128, 8, 8), jnp.float64)
    b = jax.random.normal(kb, (128, 8), jnp.float64)
    exact = dense_recurrence(A, b, method="sequential")
    got = dense_recurrence(A.astype(jnp.float32), b.astype(jnp.float32), method="associative")
    np.testing.assert_allclose(got, exact, rtol=0, atol=1e-5)


@pytest.mark.parametrize("reverse", [False, True])
def test_prefix_sum_is_identity_recurrence(reverse):
    b = jax.random.normal(jax.random.key(4), (T, D), jnp.float64)
    np.testing.assert_allclose(
        prefix_sum(b, reverse=reverse), _loop(np.ones((T, D)), b, reverse, False), rtol=1e-12
    )


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="method"):
        diagonal_recurrence(jnp.ones((2, 1)), jnp.ones((2, 1)), method="blocked")
