"""The bounded mode: parallel iterations while they pay, then an exact sequential finish."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import parallel_rnn as prnn

from .helpers import gru_problem, max_abs_diff, scan_reference


T = 60
ERR = {jnp.float32: 1e-5, jnp.float64: 1e-12}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("cost", [1e9, 5.0, 1e-3], ids=["at-once", "late", "never"])
def test_equals_the_sequential_scan_wherever_it_switches(cost, dtype):
    cell, xs, s0 = gru_problem(dtype, T, scale=6.0)  # DEER needs tens of iterations
    sol = prnn.solve_parallel(cell, xs, s0, prnn.DEER(), bounded=cost)
    assert bool(sol.converged)
    assert max_abs_diff(sol.states, scan_reference(cell, xs, s0)) < ERR[dtype]
    steps, seq = int(sol.num_steps), int(sol.sequential_steps)
    if cost == 1e9:
        assert (steps, seq) == (0, T)
    elif cost == 5.0:
        assert steps >= 1 and 0 < seq < T
    else:
        assert seq == 0


def test_switch_point_obeys_the_rule():
    # Jacobi on an integrator s_t = s_{t-1} + x_t: from the zero guess exactly one
    # more step is exact per iteration, so after n iterations the frontier is n.
    cell = lambda x, s: s + x
    xs = jnp.linspace(0.5, 1.5, 100)[:, None]
    s0 = jnp.zeros(1)
    cost = 10.0
    n = 0
    while (n + 2) * cost <= 100 - n:  # spent (init + n) + the next <= what remains
        n += 1
    sol = prnn.solve_parallel(cell, xs, s0, prnn.Jacobi(), bounded=cost)
    assert (int(sol.num_steps), int(sol.sequential_steps)) == (n, 100 - n)
    assert max_abs_diff(sol.states, scan_reference(cell, xs, s0)) < 1e-12


def test_jit_vmap_sequences_switch_at_their_own_points():
    cell, xs, s0 = gru_problem(jnp.float64, T, scale=6.0)
    batch = jnp.stack([xs, 30 * xs, 3 * xs])  # the saturated one converges sooner

    @jax.jit
    @jax.vmap
    def solve(x):
        return prnn.solve_parallel(cell, x, s0, prnn.QuasiDEER(), bounded=2.0)

    sol = solve(batch)
    assert bool(jnp.all(sol.converged))
    assert len(set(map(int, sol.sequential_steps))) > 1
    for i in range(batch.shape[0]):
        assert max_abs_diff(sol.states[i], scan_reference(cell, batch[i], s0)) < 1e-12


def test_gradient_after_a_switch_equals_bptt():
    cell, xs, s0 = gru_problem(jnp.float64, T, scale=6.0)

    def loss(c, solve):
        return jnp.sum(jnp.cos(solve(c, xs, s0)))

    par = lambda c, x, h: prnn.solve_parallel(c, x, h, prnn.DEER(), bounded=5.0).states
    g = eqx.filter_grad(loss)(cell, par)
    assert max_abs_diff(g, eqx.filter_grad(loss)(cell, scan_reference)) < 1e-8


def test_bad_bounded_is_refused():
    cell, xs, s0 = gru_problem(jnp.float64, 4)
    with pytest.raises(TypeError, match="`bounded`"):
        prnn.solve_parallel(cell, xs, s0, bounded="yes")
    with pytest.raises(ValueError, match="`bounded`"):
        prnn.solve_parallel(cell, xs, s0, bounded=-1.0)


def test_calibrate_measures_a_positive_cost_once_per_configuration():
    cell, xs, s0 = gru_problem(jnp.float32, 64)
    c = prnn.calibrate(cell, xs, s0, prnn.Jacobi(), reps=1)
    assert c >= 64 / 100 and jnp.isfinite(c)
    assert prnn.calibrate(cell, xs, s0, prnn.Jacobi(), reps=1) == c  # cached


def test_diagnose_predicts_iterations_within_a_few_times_and_prices_them():
    cell, xs, s0 = gru_problem(jnp.float64, 240, scale=2.0)
    candidates = {"QuasiDEER": prnn.QuasiDEER(), "MultipleShooting": prnn.MultipleShooting()}
    d = prnn.diagnose(cell, xs, s0, solvers=candidates, prefix=60, key=jax.random.key(0))
    assert d.T == 240 and d.prefix == 60 and set(d.predictions) == set(candidates)
    assert d.recommendation in (*candidates, "sequential")
    assert "recommended" in str(d)
    for name, solver in candidates.items():
        measured = int(prnn.solve_parallel(cell, xs, s0, solver, polish=False).num_steps)
        predicted = d.predictions[name].iterations
        assert measured / 3 <= predicted <= 3 * measured + 3, name
        assert d.predictions[name].cost == pytest.approx(
            (predicted + 1) * prnn._cost.default_cost(solver, 240, 6)
        )
