"""Gradients through solve_parallel against autodiff through an independent lax.scan.

The oracle is reverse-mode autodiff through `helpers.scan_reference` (which shares
no code with the library); one check uses central finite differences instead.
Compiled gradient functions are module-level and the gradients are cached, so
every (problem, solver) pair is compiled once and reused by several tests.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import parallel_rnn as prnn

from .helpers import scan_reference


# Picked up automatically when the damped solvers exist.
SOLVERS = {
    name: getattr(prnn, name)()
    for name in ("DEER", "QuasiDEER", "ELK", "QuasiELK", "Picard", "Jacobi")
    if hasattr(prnn, name)
}
T = 50
RTOL = 1e-6  # float64 gradients vs the oracle; default solve tolerance is 1e-10


# --------------------------------------------------------------------------------------
# Problems: `params` is what is differentiated, `build(params)` makes the cell.


def _identity(module):
    return module


def _closure_cell(W):
    # A plain closure over a traced array, with dict inputs and dict state: the
    # gradient w.r.t. W must flow through the closure (DEER issue #41 in §10).
    def cell(x, s):
        a = jnp.tanh(W @ s["a"] + x["u"] * x["scale"][0])
        b = 0.9 * s["b"] + jnp.sin(x["u"][:2]) * jnp.mean(W)
        return {"a": a, "b": b}

    return cell


class _DiagonalElman(eqx.Module):
    """`s' = tanh(W s + U x)` with an analytic `diagonal_jacobian`."""

    W: jax.Array
    U: jax.Array

    def __call__(self, x, s):
        return jnp.tanh(self.W @ s + self.U @ x)

    def diagonal_jacobian(self, x, s):
        return (1 - self(x, s) ** 2) * jnp.diag(self.W)


def gru(dtype=jnp.float64):
    cell = eqx.nn.GRUCell(3, 6, key=jax.random.key(0), dtype=dtype)
    xs = jax.random.normal(jax.random.key(1), (T, 3), dtype)
    return cell, _identity, xs, jnp.linspace(-0.5, 0.5, 6, dtype=dtype)


def lstm(dtype=jnp.float64):
    cell = eqx.nn.LSTMCell(3, 4, key=jax.random.key(2), dtype=dtype)
    xs = jax.random.normal(jax.random.key(3), (T, 3), dtype)
    return cell, _identity, xs, (jnp.full(4, 0.2, dtype), jnp.full(4, -0.1, dtype))


def closure_dict(dtype=jnp.float64):
    W = 0.4 * jax.random.normal(jax.random.key(4), (5, 5), dtype)
    xs = {
        "u": jax.random.normal(jax.random.key(5), (T, 5), dtype),
        "scale": jnp.full((T, 1), 0.7, dtype),
    }
    return W, _closure_cell, xs, {"a": jnp.full(5, 0.1, dtype), "b": jnp.ones(2, dtype)}


def diagonal_elman(dtype=jnp.float64):
    kW, kU, kx = jax.random.split(jax.random.key(6), 3)
    cell = _DiagonalElman(
        0.5 * jax.random.normal(kW, (5, 5), dtype), jax.random.normal(kU, (5, 3), dtype)
    )
    xs = jax.random.normal(kx, (T, 3), dtype)
    return cell, _identity, xs, jnp.full(5, 0.3, dtype)


PROBLEMS = {"gru": gru, "lstm": lstm, "closure_dict": closure_dict}


# --------------------------------------------------------------------------------------
# Losses and their compiled gradients (shared by all tests).


def loss_of_states(states):
    """A nonlinear loss whose cotangent differs at every time step and component."""
    total = 0.0
    for leaf in jax.tree_util.tree_leaves(states):
        weights = jnp.cos(jnp.arange(leaf.size, dtype=leaf.dtype)).reshape(leaf.shape)
        total = total + jnp.sum(weights * jnp.sin(leaf))
    return total


def parallel_loss(args, build, solver, guess=None):
    params, xs, s0 = args
    return loss_of_states(prnn.solve_parallel(build(params), xs, s0, solver, guess=guess).states)


def reference_loss(args, build):
    params, xs, s0 = args
    return loss_of_states(scan_reference(build(params), xs, s0))


grad_parallel = eqx.filter_jit(eqx.filter_grad(parallel_loss))
grad_reference = eqx.filter_jit(eqx.filter_grad(reference_loss))
reference_loss_jit = eqx.filter_jit(reference_loss)


@functools.cache
def _problem(name):
    problem = {**PROBLEMS, "diagonal_elman": diagonal_elman}[name]
    params, build, xs, s0 = problem()
    return (params, xs, s0), build


@functools.cache
def cached_grad(problem, solver):
    args, build = _problem(problem)
    if solver == "reference":
        return grad_reference(args, build)
    return grad_parallel(args, build, SOLVERS[solver])


def assert_grads_close(actual, expected, rtol):
    """Leafwise: `|a - e| <= rtol * (|e| + max|e|)`, with identical structure."""
    leaves_a, tree_a = jax.tree_util.tree_flatten(actual)
    leaves_e, tree_e = jax.tree_util.tree_flatten(expected)
    assert tree_a == tree_e
    for a, e in zip(leaves_a, leaves_e):
        a, e = np.asarray(a), np.asarray(e)
        assert a.shape == e.shape and a.dtype == e.dtype
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * np.max(np.abs(e)))


def _float_leaves(tree):
    return [
        np.asarray(x) for x in jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_inexact_array))
    ]


# --------------------------------------------------------------------------------------


# The gradient depends on the solver only through `solver.jacobian`: "dense" (a
# dense reverse scan) or "diagonal" (quasi-Newton adjoint). DEER and QuasiDEER
# cover both on every problem; every solver is checked on the GRU.
MATRIX = [(s, p) for s in ("DEER", "QuasiDEER") for p in PROBLEMS] + [
    (s, "gru") for s in SOLVERS if s not in ("DEER", "QuasiDEER")
]


@pytest.mark.parametrize("solver, problem", MATRIX)
def test_grad_wrt_params_inputs_init_matches_scan_autodiff(solver, problem):
    actual = cached_grad(problem, solver)
    expected = cached_grad(problem, "reference")
    assert_grads_close(actual, expected, RTOL)
    # Every differentiated leaf gets a non-trivial gradient (nothing silently zero).
    for leaf in _float_leaves(actual):
        assert np.max(np.abs(leaf)) > 0


def test_grad_with_analytic_diagonal_jacobian_matches_scan_autodiff():
    # The diagonal adjoint uses the cell's `diagonal_jacobian` instead of autodiff.
    actual = cached_grad("diagonal_elman", "QuasiDEER")
    assert_grads_close(actual, cached_grad("diagonal_elman", "reference"), RTOL)


@eqx.filter_jit
def _central_difference(args, build, direction, eps):
    floats, rest = eqx.partition(args, eqx.is_inexact_array)

    def at(step):
        moved = jax.tree_util.tree_map(lambda a, d: a + step * d, floats, direction)
        return reference_loss(eqx.combine(moved, rest), build)

    return (at(eps) - at(-eps)) / (2 * eps)


def test_grad_matches_central_finite_differences():
    args, build = _problem("gru")
    grad = cached_grad("gru", "DEER")
    # A random direction in every floating leaf of (params, xs, s0).
    leaves, treedef = jax.tree_util.tree_flatten(eqx.filter(args, eqx.is_inexact_array))
    rng = np.random.default_rng(0)
    direction = [rng.standard_normal(leaf.shape) for leaf in leaves]
    fd = _central_difference(args, build, jax.tree_util.tree_unflatten(treedef, direction), 1e-5)
    directional = sum(np.vdot(g, d) for g, d in zip(_float_leaves(grad), direction))
    np.testing.assert_allclose(directional, float(fd), rtol=RTOL)


@eqx.filter_jit
@eqx.filter_grad
def _grad_of_scaled_loss(args, build, solver, scale):
    params, xs, s0 = args
    states = prnn.solve_parallel(build(params), xs, s0, solver).states
    return scale * loss_of_states(states)


def test_grad_is_linear_in_the_scale_of_the_loss():
    # DEER fails the same way (zero gradient); one solver keeps the suite fast.
    args, build = _problem("gru")
    scale = 1e-12  # cotangents below the float64 default atol (1e-10)
    scaled = _grad_of_scaled_loss(args, build, prnn.QuasiDEER(), jnp.asarray(scale))
    expected = jax.tree_util.tree_map(lambda g: scale * g, cached_grad("gru", "reference"))
    assert_grads_close(scaled, expected, RTOL)


def test_grad_does_not_depend_on_solver():
    grads = [cached_grad("gru", name) for name in SOLVERS]
    for other in grads[1:]:
        # Both are the exact adjoint up to the (1e-10) solve tolerance.
        assert_grads_close(other, grads[0], 1e-8)


@functools.cache
def _grad_with_guess():
    (params, xs, s0), build = _problem("gru")
    # A warm start near, but not at, the solution, as in training.
    guess = scan_reference(params, xs, s0) + 0.05 * jnp.sin(jnp.arange(T))[:, None]

    @eqx.filter_jit
    @eqx.filter_grad
    def grad_both(args_and_guess):
        args, guess = args_and_guess
        return parallel_loss(args, build, SOLVERS["QuasiDEER"], guess=guess)

    return grad_both(((params, xs, s0), guess))


def test_grad_does_not_depend_on_guess():
    grad_args, _ = _grad_with_guess()
    assert_grads_close(grad_args, cached_grad("gru", "QuasiDEER"), 1e-8)


def test_guess_gets_zero_gradient():
    _, grad_guess = _grad_with_guess()
    assert grad_guess.shape == (T, 6)
    assert np.all(np.asarray(grad_guess) == 0)


def test_grad_of_batched_loss_under_jit_and_vmap():
    cell, _, _, _ = gru()
    B = 3
    xs = jax.random.normal(jax.random.key(8), (B, T, 3))
    # Sequence 2 is constant, so it converges in fewer iterations than the others:
    # the batched forward and adjoint loops must stop per sequence.
    xs = xs.at[2].set(0.0)
    s0 = jnp.stack([jnp.zeros(6), jnp.full(6, 0.3), jnp.zeros(6)])

    def batched(solve):
        def loss(args):
            cell, xs, s0 = args
            states = jax.vmap(lambda x, s: solve(cell, x, s))(xs, s0)
            return loss_of_states(states)

        # Plain jax transforms here (the other tests use Equinox's filtered ones).
        return jax.jit(jax.grad(loss))

    solve = lambda c, x, s: prnn.solve_parallel(c, x, s, prnn.QuasiDEER()).states
    actual = batched(solve)((cell, xs, s0))
    expected = batched(scan_reference)((cell, xs, s0))
    assert_grads_close(actual, expected, RTOL)
    assert actual[1].shape == (B, T, 3) and actual[2].shape == (B, 6)


def test_grad_float32_is_close_to_float64_scan_autodiff():
    args, build = _problem("gru")
    args32 = jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float32) if eqx.is_inexact_array(a) else a, args
    )
    actual = grad_parallel(args32, build, prnn.QuasiDEER())
    for a in _float_leaves(actual):
        assert a.dtype == np.float32
    expected = jax.tree_util.tree_map(
        lambda a: np.asarray(a, np.float32), cached_grad("gru", "reference")
    )
    # float32 solves stop at rtol 1e-5; the gradient inherits about that accuracy.
    assert_grads_close(actual, expected, 1e-3)


class _SkewedJacobianGRU(eqx.Module):
    """`cells.GRU` whose closed-form Jacobian is deliberately wrong (scaled by 0.8)."""

    gru: prnn.cells.GRU

    def __call__(self, x, h):
        return self.gru(x, h)

    def value_and_jacobian(self, x, h):
        value, jac = self.gru.value_and_jacobian(x, h)
        return value, 0.8 * jac


def test_inexact_closed_form_jacobian_costs_iterations_not_correctness():
    # The Jacobian only steers the Newton steps; residuals (forward) and the
    # adjoint's residual (backward) use the cell itself, so states and gradients
    # stay exact, only the iteration count grows.
    gru = prnn.cells.GRU(3, 5, key=jax.random.key(40))
    xs = jax.random.normal(jax.random.key(41), (T, 3))
    h0 = jnp.zeros(5)
    skewed = _SkewedJacobianGRU(gru)

    def loss(cell, solve):
        return jnp.sum(jnp.sin(solve(cell)))

    exact = prnn.solve_parallel(gru, xs, h0, prnn.DEER())
    sol = prnn.solve_parallel(skewed, xs, h0, prnn.DEER())
    assert int(sol.num_steps) > int(exact.num_steps)
    np.testing.assert_allclose(sol.states, scan_reference(gru, xs, h0), rtol=0, atol=1e-9)

    grad = eqx.filter_grad(loss)(
        skewed, lambda c: prnn.solve_parallel(c, xs, h0, prnn.DEER()).states
    )
    ref = eqx.filter_grad(loss)(gru, lambda c: scan_reference(c, xs, h0))
    for g, r in zip(jax.tree_util.tree_leaves(grad.gru), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(g, r, rtol=RTOL, atol=1e-10)
