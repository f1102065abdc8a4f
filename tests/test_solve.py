"""solve_parallel against an independent lax.scan, for every undamped solver."""

import jax
import jax.numpy as jnp
import pytest

import parallel_rnn as prnn

from .helpers import gru_problem, lstm_problem, max_abs_diff, scan_reference


SOLVERS = (prnn.DEER(), prnn.QuasiDEER(), prnn.Picard(), prnn.Jacobi())
T = 40
# Max abs error vs sequential evaluation allowed with default tolerances.
ERR = {jnp.float32: 1e-4, jnp.float64: 1e-8}


def gru(dtype):
    return gru_problem(dtype, T)


def lstm(dtype):
    return lstm_problem(dtype, T)


def closure_dict(dtype):
    W = 0.4 * jax.random.normal(jax.random.key(4), (5, 5), dtype)

    def cell(x, s):
        return jnp.tanh(W @ s["a"] + x["u"] * x["scale"][0]), s["b"] * 0.9 + x["u"][:2]

    cell_dict = lambda x, s: dict(zip(("a", "b"), cell(x, s)))
    xs = {
        "u": jax.random.normal(jax.random.key(5), (T, 5), dtype),
        "scale": jnp.ones((T, 1), dtype),
    }
    return cell_dict, xs, {"a": jnp.zeros(5, dtype), "b": jnp.ones(2, dtype)}


PROBLEMS = {"gru": gru, "lstm": lstm, "closure_dict": closure_dict}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
def test_matches_sequential_scan(solver, problem, dtype):
    cell, xs, s0 = PROBLEMS[problem](dtype)
    sol = prnn.solve_parallel(cell, xs, s0, solver)
    assert bool(sol.converged)
    assert 1 <= int(sol.num_steps) <= T
    assert jax.tree_util.tree_structure(sol.states) == jax.tree_util.tree_structure(s0)
    for leaf in jax.tree_util.tree_leaves(sol.states):
        assert leaf.dtype == dtype
    assert max_abs_diff(sol.states, scan_reference(cell, xs, s0)) < ERR[dtype]


def test_solve_sequential_matches_scan():
    cell, xs, s0 = lstm(jnp.float64)
    assert max_abs_diff(prnn.solve_sequential(cell, xs, s0), scan_reference(cell, xs, s0)) == 0


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
def test_under_jit_and_vmap_each_sequence_reports_its_own_steps(solver):
    cell, _, s0 = gru(jnp.float64)
    # Sequence 1 is constant: solved after one step by any solver, unlike sequence 0.
    xs = jnp.stack([jax.random.normal(jax.random.key(6), (T, 3)), jnp.zeros((T, 3))])
    guess = jnp.stack([jnp.zeros((T, 6)), scan_reference(cell, xs[1], s0)])

    @jax.jit
    def run(xs, guess):
        return jax.vmap(lambda x, g: prnn.solve_parallel(cell, x, s0, solver, guess=g))(xs, guess)

    sol = run(xs, guess)
    assert sol.num_steps.shape == (2,) and sol.converged.shape == (2,)
    assert bool(jnp.all(sol.converged))
    assert int(sol.num_steps[1]) == 0 < int(sol.num_steps[0])
    for b in range(2):
        assert max_abs_diff(sol.states[b], scan_reference(cell, xs[b], s0)) < 1e-8


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
def test_single_time_step(solver):
    cell, xs, s0 = lstm(jnp.float64)
    sol = prnn.solve_parallel(cell, xs[:1], s0, solver)
    assert bool(sol.converged) and int(sol.num_steps) <= 1
    assert max_abs_diff(sol.states, scan_reference(cell, xs[:1], s0)) < 1e-12


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
def test_exact_guess_converges_in_at_most_one_step(solver):
    cell, xs, s0 = lstm(jnp.float64)
    exact = scan_reference(cell, xs, s0)
    sol = prnn.solve_parallel(cell, xs, s0, solver, guess=exact)
    assert bool(sol.converged) and int(sol.num_steps) <= 1


def test_deer_trace_decreases_and_is_nan_after_the_stop():
    cell, xs, s0 = gru(jnp.float64)
    sol = prnn.solve_parallel(cell, xs, s0, prnn.DEER(), trace=True)
    n = int(sol.num_steps)
    assert sol.trace.shape == (T,)
    steps = sol.trace[:n]
    assert bool(jnp.all(jnp.isfinite(steps))) and bool(jnp.all(jnp.isnan(sol.trace[n:])))
    assert bool(jnp.all(steps[1:] < steps[:-1]))
    # The trace is the loop's; the polish after it changes the states (and the
    # certified residual) only while the solve stays converged.
    assert bool(sol.converged) and float(steps[-1]) < 1e-9
    assert prnn.solve_parallel(cell, xs, s0, prnn.DEER()).trace is None


def lorenz96(u, x):
    """One RK4 step (dt=0.01, F=8) of Lorenz-96, written here as an independent oracle."""

    def rhs(x):
        return (jnp.roll(x, -1) - jnp.roll(x, 2)) * jnp.roll(x, 1) - x + 8.0 + u

    dt = 0.01
    k1 = rhs(x)
    k2 = rhs(x + dt / 2 * k1)
    k3 = rhs(x + dt / 2 * k2)
    k4 = rhs(x + dt * k3)
    return x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


@pytest.mark.parametrize(
    "solver, dtype",
    [(prnn.DEER(), jnp.float32), (prnn.DEER(), jnp.float64), (prnn.QuasiDEER(), jnp.float32)],
    ids=["DEER-f32", "DEER-f64", "QuasiDEER-f32"],
)
def test_chaotic_lorenz96_from_zero_guess_converges_within_T(solver, dtype):
    T_l = 1000
    xs = jnp.zeros((T_l, 5), dtype)
    x0 = (8.0 + jax.random.normal(jax.random.key(7), (5,))).astype(dtype)
    sol = prnn.solve_parallel(lorenz96, xs, x0, solver, guess=jnp.zeros((T_l, 5), dtype))
    assert bool(sol.converged) and int(sol.num_steps) <= T_l
    assert bool(jnp.all(jnp.isfinite(sol.states)))
    # Chaos amplifies round-off, so compare the residual, not the trajectory.
    r = sol.states - jax.vmap(lorenz96)(xs, jnp.concatenate([x0[None], sol.states[:-1]]))
    rtol = 1e-5 if dtype == jnp.float32 else 1e-10
    assert bool(jnp.all(jnp.abs(r) <= rtol * (1 + jnp.abs(sol.states))))
