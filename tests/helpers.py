"""Shared test utilities: problem factories, dense oracles, one comparator.

Oracles here never call the library's solvers.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


def scan_reference(cell, inputs, init_state):
    """Sequential evaluation written independently of `parallel_rnn.solve_sequential`."""

    def step(state, x_t):
        new = cell(x_t, state)
        return new, new

    return jax.lax.scan(step, init_state, inputs)[1]


def tree_allclose(x, y, *, rtol: float = 1e-5, atol: float = 1e-8) -> bool:
    """Same structure, shapes and dtypes, and every leaf close (as in Optimistix's tests)."""
    return eqx.tree_equal(x, y, typematch=True, rtol=rtol, atol=atol) is True


def max_abs_diff(a, b) -> float:
    """The largest absolute difference over all leaves of two pytrees."""
    diffs = jax.tree_util.tree_map(lambda x, y: jnp.max(jnp.abs(x - y)), a, b)
    return float(max(jax.tree_util.tree_leaves(diffs)))


def gru_problem(dtype, T: int, hidden: int = 6, *, scale: float = 1.0):
    """`(eqx.nn.GRUCell(3, hidden), inputs (T, 3), zero h0)`; `scale` multiplies `weight_hh`."""
    cell = eqx.nn.GRUCell(3, hidden, key=jax.random.key(0), dtype=dtype)
    if scale != 1.0:
        cell = eqx.tree_at(lambda c: c.weight_hh, cell, scale * cell.weight_hh)
    xs = jax.random.normal(jax.random.key(1), (T, 3), dtype)
    return cell, xs, jnp.zeros(hidden, dtype)


def lstm_problem(dtype, T: int, hidden: int = 4):
    """`(eqx.nn.LSTMCell(3, hidden), inputs (T, 3), (h0, c0))`, a pytree state."""
    cell = eqx.nn.LSTMCell(3, hidden, key=jax.random.key(2), dtype=dtype)
    xs = jax.random.normal(jax.random.key(3), (T, 3), dtype)
    return cell, xs, (jnp.zeros(hidden, dtype), jnp.full(hidden, 0.1, dtype))


def dense_bidiagonal(A) -> np.ndarray:
    """The `(T·D, T·D)` matrix `J` of `δ ↦ (δ_t - A_t δ_{t-1})_t` (`A[0]` unused).

    `A` is dense `(T, D, D)` or diagonal `(T, D)`. `J` is the Jacobian of the
    residual of a linear recurrence: the oracle for scans, Kalman and LM steps.
    """
    A = np.asarray(A)
    if A.ndim == 2:
        A = np.stack([np.diag(a) for a in A])
    T, D = A.shape[:2]
    J = np.eye(T * D)
    for t in range(1, T):
        J[t * D : (t + 1) * D, (t - 1) * D : t * D] = -A[t]
    return J
