"""ELK / QuasiELK: the LM step against dense normal equations, and the solvers
against an independent lax.scan (values) and autodiff through it (gradients)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import parallel_rnn as prnn
from parallel_rnn._problem import FlatCell, Problem, make_spec
from parallel_rnn._solver.base import Iterate

from .helpers import dense_bidiagonal, gru_problem, lstm_problem, max_abs_diff, scan_reference


T = 24
ERR = {jnp.float32: 1e-4, jnp.float64: 1e-8}
SOLVERS = (prnn.ELK(), prnn.QuasiELK())


def gru(dtype, scale=1.0):
    return gru_problem(dtype, T, 5, scale=scale)


def lstm(dtype):
    return lstm_problem(dtype, T)


class Lorenz96(eqx.Module):
    """One explicit Euler step (dt = 0.01) of Lorenz96 with forcing F + u."""

    def __call__(self, u, x):
        dx = (jnp.roll(x, -1) - jnp.roll(x, 2)) * jnp.roll(x, 1) - x + 8.0 + u
        return x + 0.01 * dx


PROBLEMS = {"gru": gru, "lstm": lstm}


# --------------------------------------------------------------------------- the step


def _flat_problem(cell, xs, s0):
    spec = make_spec(s0)
    return Problem(FlatCell(cell, None, spec), xs, spec.ravel(s0))


def _dense_lm_step(jac, r, lam, frontier):
    """Solve (JᵀJ + λ I) δ = -Jᵀ r on the unsolved steps t > frontier, with
    δ_t = 0 before the frontier and δ_frontier = -r_frontier, as one dense system."""
    T_, D = r.shape
    J = dense_bidiagonal(jac)
    fixed = np.zeros(T_ * D)
    fixed[frontier * D : (frontier + 1) * D] = -np.asarray(r)[frontier]
    free = slice((frontier + 1) * D, None)
    Jf = J[:, free]
    rhs = -Jf.T @ (np.ravel(r) + J @ fixed)
    delta = fixed.copy()
    delta[free] = np.linalg.solve(Jf.T @ Jf + lam * np.eye(Jf.shape[1]), rhs)
    return delta.reshape(T_, D)


@eqx.filter_jit
def _one_step(solver, problem, guess, frontier):
    it, state = solver.init(problem, guess)
    new, _ = solver.step(problem, it, state, frontier)
    return it, new


@pytest.mark.parametrize("frontier", [0, 7])
@pytest.mark.parametrize(
    "solver",
    [
        prnn.ELK(adaptive=False, posterior="smoother"),
        prnn.QuasiELK(adaptive=False, posterior="smoother"),
    ],
    ids=["ELK", "QuasiELK"],
)
@pytest.mark.parametrize("scan", ["associative", "sequential"])
def test_step_solves_dense_normal_equations(solver, scan, frontier):
    solver = eqx.tree_at(lambda s: (s.damping, s.scan), solver, (0.3, scan))
    cell, xs, s0 = gru(jnp.float64, scale=2.0)
    problem = _flat_problem(cell, xs, s0)
    guess = 0.3 * jax.random.normal(jax.random.key(9), (T, 5), jnp.float64)
    it, new = _one_step(solver, problem, guess, jnp.int32(frontier))
    expected = _dense_lm_step(it.jac, it.states - it.fs, 0.3, frontier)
    np.testing.assert_allclose(new.states - guess, expected, rtol=0, atol=1e-10)


def test_zero_damping_reproduces_the_deer_step():
    cell, xs, s0 = gru(jnp.float64, scale=2.0)
    problem = _flat_problem(cell, xs, s0)
    guess = 0.3 * jax.random.normal(jax.random.key(9), (T, 5), jnp.float64)
    for damped, undamped in [(prnn.ELK, prnn.DEER), (prnn.QuasiELK, prnn.QuasiDEER)]:
        _, a = _one_step(
            damped(damping=1e-12, adaptive=False, posterior="smoother"),
            problem,
            guess,
            jnp.int32(0),
        )
        _, b = _one_step(undamped(), problem, guess, jnp.int32(0))
        np.testing.assert_allclose(a.states, b.states, rtol=0, atol=1e-9)


def test_rejected_step_is_the_minimal_safe_step():
    # With a huge damping the proposal is (almost) the minimal safe step, so the
    # iterate must advance exactly one time step and stay consistent.
    cell, xs, s0 = gru(jnp.float64)
    problem = _flat_problem(cell, xs, s0)
    solver = prnn.ELK(damping=1e9, adaptive=True, posterior="smoother")
    guess = jnp.ones((T, 5))
    it, st = solver.init(problem, guess)
    new, st = eqx.filter_jit(solver.step)(problem, it, st, jnp.int32(0))
    assert isinstance(new, Iterate)
    np.testing.assert_allclose(new.states[0], it.fs[0], atol=1e-12)
    np.testing.assert_allclose(new.fs, problem.evaluate(new.states), atol=1e-12)
    assert st.lam.dtype == st.nu.dtype == jnp.float64 and st.lam.shape == ()


# --------------------------------------------------------------------------- solves


@eqx.filter_jit
def _solve_batch(solver, cell, xs, s0):
    # One compilation per (solver, problem, dtype); vmap over a batch of inputs.
    return jax.vmap(lambda x: prnn.solve_parallel(cell, x, s0, solver, throw=False))(xs)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
def test_matches_sequential_scan_under_jit_and_vmap(solver, problem, dtype):
    cell, xs, s0 = PROBLEMS[problem](dtype)
    batch = jnp.stack([xs, 2 * xs[::-1]])
    sol = _solve_batch(solver, cell, batch, s0)
    assert bool(jnp.all(sol.converged))
    assert bool(jnp.all((1 <= sol.num_steps) & (sol.num_steps <= T)))
    for i in range(2):
        states = jax.tree_util.tree_map(lambda a: a[i], sol.states)
        for leaf in jax.tree_util.tree_leaves(states):
            assert leaf.dtype == dtype
        assert max_abs_diff(states, scan_reference(cell, batch[i], s0)) < ERR[dtype]


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
def test_chaotic_lorenz96_converges_within_T_with_finite_states(solver):
    n = 200
    xs = 0.1 * jax.random.normal(jax.random.key(4), (n, 5))
    s0 = 8.0 + jax.random.normal(jax.random.key(5), (5,))
    sol = prnn.solve_parallel(Lorenz96(), xs, s0, solver, throw=False, trace=True)
    assert bool(sol.converged) and int(sol.num_steps) <= n
    assert bool(jnp.all(jnp.isfinite(sol.states)))
    # Chaos amplifies round-off (LLE > 0), so the residual is the sharp check and
    # the trajectory only agrees loosely after 200 steps.
    r = sol.states - jax.vmap(Lorenz96())(xs, jnp.concatenate([s0[None], sol.states[:-1]]))
    assert float(jnp.max(jnp.abs(r))) <= 1e-10 * (1 + float(jnp.max(jnp.abs(sol.states))))
    assert max_abs_diff(sol.states, scan_reference(Lorenz96(), xs, s0)) < 1e-5


@pytest.mark.parametrize(
    "solver",
    [
        prnn.ELK(damping=0.1, adaptive=False),
        prnn.QuasiELK(damping=0.1, adaptive=False),
        prnn.ELK(adaptive=True, posterior="smoother"),
        prnn.QuasiELK(damping=1e-2, adaptive=False, posterior="filter"),
        prnn.QuasiELK(scan="associative"),
    ],
    ids=[
        "ELK-fixed",
        "QuasiELK-fixed",
        "ELK-adaptive-smoother",
        "QuasiELK-fixed-filter",
        "QuasiELK-assoc",
    ],
)
def test_options_converge_to_the_scan(solver):
    cell, xs, s0 = gru(jnp.float64, scale=2.0)
    sol = prnn.solve_parallel(cell, xs, s0, solver)
    assert bool(sol.converged) and int(sol.num_steps) <= T
    assert max_abs_diff(sol.states, scan_reference(cell, xs, s0)) < 1e-8


def test_invalid_options_raise():
    with pytest.raises(ValueError, match="damping"):
        prnn.ELK(damping=-1.0)
    with pytest.raises(ValueError, match="posterior"):
        prnn.QuasiELK(posterior="median")
    with pytest.raises(ValueError, match="method"):
        prnn.ELK(scan="parallel")


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
def test_gradients_match_autodiff_through_scan(solver):
    cell, xs, s0 = gru(jnp.float64)
    w = jax.random.normal(jax.random.key(7), (T, 5))

    def loss(args, solve):
        cell, xs, s0 = args
        return jnp.sum(w * jnp.tanh(solve(cell, xs, s0)))

    # One gradient in the cell's parameters, the inputs and s_0 together (one
    # compile each way instead of one per argument).
    grad = eqx.filter_jit(eqx.filter_grad(loss))
    par = lambda c, x, s: prnn.solve_parallel(c, x, s, solver).states
    got = grad((cell, xs, s0), par)
    want = grad((cell, xs, s0), scan_reference)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for g, e in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-10)
    assert float(jnp.max(jnp.abs(want[1]))) > 1e-3  # the inputs' gradient is not zero
