"""The Kalman filter / RTS smoother of `_kalman` against a sequential numpy oracle.

Model: s_1 ~ N(b_1, I), s_t | s_{t-1} ~ N(A_t s_{t-1} + b_t, I), y_t ~ N(s_t, I/λ).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from parallel_rnn import _kalman

from .helpers import dense_bidiagonal


@jax.jit
def _both(A, b, lam, y):
    # One compilation per (shape, dtype) serves every test and both methods; λ is
    # traced, so changing it does not recompile.
    return {
        method: (
            _kalman.kalman_filter(A, b, lam, y, method=method),
            _kalman.kalman_smoother(A, b, lam, y, method=method),
        )
        for method in METHODS
    }


def kalman_filter(A, b, lam, y, *, method):
    return _both(A, b, jnp.asarray(lam, b.dtype), y)[method][0]


def kalman_smoother(A, b, lam, y, *, method):
    return _both(A, b, jnp.asarray(lam, b.dtype), y)[method][1]


T, D = 12, 3
METHODS = ("associative", "sequential")


def oracle(A, b, y, lam):
    """Textbook covariance-form Kalman filter + RTS smoother, Python loops in numpy."""
    A, b, y = (np.asarray(v, np.float64) for v in (A, b, y))
    T, D = b.shape
    eye = np.eye(D)
    lams = np.broadcast_to(np.asarray(lam, np.float64), (T,))
    m_f, P_f, m_p, P_p = [], [], [], []
    m, P = None, None
    for t in range(T):
        if t == 0:
            mp, Pp = b[0], eye.copy()
        else:
            mp, Pp = A[t] @ m + b[t], A[t] @ P @ A[t].T + eye
        K = eye if np.isinf(lams[t]) else Pp @ np.linalg.inv(Pp + eye / lams[t])
        m = mp + K @ (y[t] - mp)
        P = (eye - K) @ Pp
        m_f.append(m), P_f.append(P), m_p.append(mp), P_p.append(Pp)
    ms, Ps = [m_f[-1]], [P_f[-1]]
    for t in range(T - 2, -1, -1):
        E = P_f[t] @ A[t + 1].T @ np.linalg.inv(P_p[t + 1])
        ms.insert(0, m_f[t] + E @ (ms[0] - m_p[t + 1]))
        Ps.insert(0, P_f[t] + E @ (Ps[0] - P_p[t + 1]) @ E.T)
    return np.array(m_f), np.array(P_f), np.array(ms), np.array(Ps)


def problem(dtype, diagonal, scale=0.9):
    kA, kb, ky = jax.random.split(jax.random.key(0), 3)
    if diagonal:
        A = scale * jax.random.uniform(kA, (T, D), dtype, -1.2, 1.2)
    else:
        A = scale * jax.random.normal(kA, (T, D, D), dtype) / D**0.5
    b = jax.random.normal(kb, (T, D), dtype)
    y = jax.random.normal(ky, (T, D), dtype)
    return A, b, y


def dense_of(A):
    return A if A.ndim == 3 else jax.vmap(jnp.diag)(A)


def diag_of(P):
    return np.diagonal(P, axis1=-2, axis2=-1)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("diagonal", [False, True], ids=["dense", "diagonal"])
@pytest.mark.parametrize("lam", [1e-3, 0.7, 30.0])  # traced: no recompiles
def test_filter_and_smoother_match_sequential_oracle_f64(lam, diagonal, method):
    A, b, y = problem(jnp.float64, diagonal)
    m_f, P_f, m_s, P_s = oracle(dense_of(A), b, y, lam)
    mf, Pf = kalman_filter(A, b, lam, y, method=method)
    ms, Ps = kalman_smoother(A, b, lam, y, method=method)
    if diagonal:
        assert Pf.shape == Ps.shape == (T, D)
        P_f, P_s = diag_of(P_f), diag_of(P_s)
    np.testing.assert_allclose(mf, m_f, rtol=0, atol=1e-10)
    np.testing.assert_allclose(Pf, P_f, rtol=0, atol=1e-10)
    np.testing.assert_allclose(ms, m_s, rtol=0, atol=1e-10)
    np.testing.assert_allclose(Ps, P_s, rtol=0, atol=1e-10)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("diagonal", [False, True], ids=["dense", "diagonal"])
def test_filter_and_smoother_float32_close_to_oracle(diagonal, method):
    A, b, y = problem(jnp.float32, diagonal)
    lam = 0.5
    m_f, _, m_s, P_s = oracle(dense_of(A), b, y, lam)
    mf, _ = kalman_filter(A, b, jnp.float32(lam), y, method=method)
    ms, Ps = kalman_smoother(A, b, jnp.float32(lam), y, method=method)
    assert ms.dtype == Ps.dtype == jnp.float32
    if diagonal:
        P_s = diag_of(P_s)
    np.testing.assert_allclose(mf, m_f, atol=1e-4)
    np.testing.assert_allclose(ms, m_s, atol=1e-4)
    np.testing.assert_allclose(Ps, P_s, atol=1e-4)


@pytest.mark.parametrize("diagonal", [False, True], ids=["dense", "diagonal"])
def test_smoother_mean_minimises_lm_objective(diagonal):
    # The smoothed mean solves the normal equations of
    # ½Σ‖s_t - A_t s_{t-1} - b_t‖² + (λ/2)Σ‖s_t - y_t‖², built densely here.
    A, b, y = problem(jnp.float64, diagonal, scale=1.5)
    lam = 0.2
    J = dense_bidiagonal(A)
    lhs = J.T @ J + lam * np.eye(T * D)
    rhs = J.T @ np.ravel(b) + lam * np.ravel(y)
    expected = np.linalg.solve(lhs, rhs).reshape(T, D)
    for method in METHODS:
        ms, _ = kalman_smoother(A, b, lam, y, method=method)
        np.testing.assert_allclose(ms, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("diagonal", [False, True], ids=["dense", "diagonal"])
def test_zero_precision_is_the_linear_recurrence_and_large_precision_the_observations(diagonal):
    A, b, y = problem(jnp.float64, diagonal)
    x, xs = jnp.zeros(D), []
    for t in range(T):
        x = (dense_of(A)[t] @ x if t else 0 * x) + b[t]
        xs.append(x)
    for method in METHODS:
        ms, _ = kalman_smoother(A, b, 0.0, y, method=method)
        np.testing.assert_allclose(ms, np.array(xs), rtol=1e-12, atol=1e-12)
        ms, _ = kalman_smoother(A, b, 1e12, y, method=method)
        np.testing.assert_allclose(ms, y, atol=1e-9)


def test_traced_precision_and_shape_errors():
    A, b, y = problem(jnp.float64, False)
    ref = _kalman.kalman_smoother(A, b, 0.3, method="sequential")[0]  # y=None means zeros
    np.testing.assert_allclose(
        kalman_smoother(A, b, 0.3, 0 * y, method="associative")[0], ref, atol=1e-12
    )
    with pytest.raises(ValueError, match="shape"):
        _kalman.kalman_smoother(A[:, :2], b, 0.3)


@pytest.mark.parametrize("D", [1, 5, 17, 40], ids=["D1", "D5", "D17-paired", "D40-blocked"])
def test_spd_solve_matches_dense_solve(D):
    # The kind of matrix the sequential recursions solve: I + λ A Aᵀ, badly scaled.
    A = jax.random.normal(jax.random.key(7), (D, D), jnp.float64)
    M = jnp.eye(D) + 1e4 * A @ A.T
    R = jax.random.normal(jax.random.key(8), (D, D + 1), jnp.float64)
    got = jax.jit(_kalman._spd_solve)(M, R)
    np.testing.assert_allclose(M @ got, R, rtol=0, atol=1e-8 * float(jnp.abs(R).max()))


@jax.jit
def solve(M, R):
    return _kalman._block_gauss_jordan(M, R)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    D=st.sampled_from([16, 37]),  # one block; three, padded (two compilations in all)
    log_scale=st.floats(-3, 4),
    seed=st.integers(0, 2**16),
)
def test_blocked_spd_solve_agrees_with_lapack_solve(D, log_scale, seed):
    K = 3
    kA, kR = jax.random.split(jax.random.key(seed))
    A = jax.random.normal(kA, (D, D), jnp.float64)
    M = jnp.eye(D) + 10.0**log_scale * A @ A.T / D  # eigenvalues >= 1, as in the filter
    R = jax.random.normal(kR, (D, K), jnp.float64)
    got = solve(M, R)
    want = np.linalg.solve(M, R)  # LAPACK, pivoted LU
    # Agreement up to the condition number, as for any backward-stable solve.
    cond = np.linalg.cond(M)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * cond * np.abs(want).max())


@jax.jit
def _sequential_both(A, b, lam, y):
    return (
        _kalman.kalman_filter(A, b, lam, y, method="sequential"),
        _kalman.kalman_smoother(A, b, lam, y, method="sequential"),
    )


@pytest.mark.parametrize("D", [13, 33], ids=["D13-paired", "D33-blocked"])
def test_pinned_steps_skipped_exactly(D):
    # D = 13: products and the paired solve with D + 1 right-hand sides (odd D:
    # the last pivot is single); D = 33: blocked solves, padded.
    # ELK's λ_t: inf on a solved prefix (skipped by the sequential form when D > 8)
    # and, to reach the general case too, on one isolated later step. (The
    # associative form is checked against the oracle above.)
    T_ = 7
    kA, kb, ky = jax.random.split(jax.random.key(3), 3)
    A = 0.9 * jax.random.normal(kA, (T_, D, D), jnp.float64) / D**0.5
    b = jax.random.normal(kb, (T_, D), jnp.float64)
    y = jax.random.normal(ky, (T_, D), jnp.float64)
    lam = jnp.array([jnp.inf, jnp.inf, 0.3, 0.3, jnp.inf, 0.3, 0.3])
    m_f, _, m_s, P_s = oracle(A, b, y, np.asarray(lam))
    (mf, _), (ms, Ps) = _sequential_both(A, b, lam, y)
    np.testing.assert_allclose(mf, m_f, rtol=0, atol=1e-10)
    np.testing.assert_allclose(ms, m_s, rtol=0, atol=1e-10)
    np.testing.assert_allclose(Ps, P_s, rtol=0, atol=1e-10)
    np.testing.assert_array_equal(mf[:2], y[:2])  # exact observations
    np.testing.assert_array_equal(Ps[:2], 0)


@jax.jit
@jax.vmap
def _batched_sequential_filter(A, b, lam, y):
    return _kalman.kalman_filter(A, b, lam, y, method="sequential")


def test_paired_solve_filter_float32_under_vmap_matches_oracle():
    # The sequential dense step for 8 < D < 32 (one product A[P | m], one paired
    # Gauss–Jordan solve for covariance and mean) in float32, batched by vmap
    # (where the pinned-step `lax.cond` becomes a select), against the float64 oracle.
    T_, D_ = 6, 12
    kA, kb, ky = jax.random.split(jax.random.key(5), 3)
    A = 1.3 * jax.random.normal(kA, (2, T_, D_, D_), jnp.float32) / D_**0.5
    b = jax.random.normal(kb, (2, T_, D_), jnp.float32)
    y = jax.random.normal(ky, (2, T_, D_), jnp.float32)
    lam = jnp.array([[jnp.inf, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3], [0.7] * T_], jnp.float32)
    m, P = _batched_sequential_filter(A, b, lam, y)
    assert m.dtype == P.dtype == jnp.float32
    for i in range(2):
        m_f, P_f, _, _ = oracle(A[i], b[i], y[i], np.asarray(lam[i]))
        np.testing.assert_allclose(m[i], m_f, rtol=0, atol=1e-4 * np.abs(m_f).max())
        np.testing.assert_allclose(P[i], P_f, rtol=0, atol=1e-4 * np.abs(P_f).max())
