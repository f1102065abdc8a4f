"""The Newton polish and the error estimate, against lax.scan references."""

import jax
import jax.numpy as jnp
import pytest

import parallel_rnn as prnn

from .helpers import gru_problem, max_abs_diff, scan_reference
from .trained import ar_gru3


def _loose(cell, xs, s0, solver, tol, **kw):
    return prnn.solve_parallel(cell, xs, s0, solver, rtol=tol, atol=tol, throw=False, **kw)


@pytest.mark.parametrize(
    "case",
    ["contractive", "marginal"],
)
def test_estimate_is_within_a_few_times_the_true_error(case):
    # A loose tolerance leaves a real error for the estimate to find (float64, so
    # round-off is far below it).
    if case == "contractive":
        cell, xs, s0 = gru_problem(jnp.float64, 60)
        tol = 1e-5
    else:  # trained AR GRU, largest Lyapunov exponent ≈ 0 along its trajectory
        cell, xs, s0 = ar_gru3(jnp.float64)
        tol = 1e-6
    ref = scan_reference(cell, xs, s0)
    raw = _loose(cell, xs, s0, prnn.QuasiDEER(), tol, polish=False)
    assert raw.error_estimate is None
    sol = _loose(cell, xs, s0, prnn.QuasiDEER(), tol)
    error = max_abs_diff(raw.states, ref)
    assert error > 10 * tol or case == "contractive"
    assert error / 3 <= float(sol.error_estimate) <= 3 * error
    # The polish is one exact Newton step: the returned states are far closer.
    assert bool(sol.converged)
    assert max_abs_diff(sol.states, ref) < error / 10


def test_polish_brings_a_float32_trained_model_to_the_float32_floor():
    cell, xs, s0 = ar_gru3(jnp.float32)
    ref = scan_reference(*ar_gru3(jnp.float64))
    floor = max_abs_diff(scan_reference(cell, xs, s0).astype(jnp.float64), ref)
    raw = prnn.solve_parallel(cell, xs, s0, prnn.QuasiDEER(), polish=False)
    sol = prnn.solve_parallel(cell, xs, s0, prnn.QuasiDEER())
    before = max_abs_diff(raw.states.astype(jnp.float64), ref)
    after = max_abs_diff(sol.states.astype(jnp.float64), ref)
    assert bool(sol.converged) and sol.states.dtype == jnp.float32
    assert before > 5 * floor  # the converged answer drifted along the trajectory
    assert after < 2 * floor


def test_chaotic_cell_refuses_a_polish_that_would_break_the_certificate():
    # weight_hh x 6: the exact trajectory is sensitive to every rounding; whatever
    # the estimate says, the returned states stay certified and finite.
    cell, xs, s0 = gru_problem(jnp.float64, 60, scale=6.0)
    sol = prnn.solve_parallel(cell, xs, s0, prnn.DEER())
    assert bool(sol.converged) and bool(jnp.all(jnp.isfinite(sol.states)))
    assert float(sol.error_estimate) >= 0
    assert jax.numpy.isfinite(sol.residual)
