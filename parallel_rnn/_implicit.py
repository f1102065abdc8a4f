"""The derivative of a solve: one custom JVP for `solve_parallel` and `solve_sharded`.

The solver's iterations run on a copy of the problem without gradient
(`no_gradient`); `implicit` then attaches to their answer the derivative of the
exact recurrence. Its JVP solves the tangent recurrence (`_adjoint.tangent`);
JAX transposes it into reverse mode through `lax.custom_linear_solve`, whose
transposed solve is the adjoint recurrence (`_adjoint.adjoint`). So forward mode,
reverse mode and their compositions (hessians) all follow from one rule.

Where the trajectory lives is a `Layout`: `Local()` (one device) evaluates
everything as is; the sequence-sharded layout (`_solve_sharded.py`) runs the
same functions per shard inside `shard_map`. The rule itself is written once.
"""

from collections.abc import Callable

import equinox as eqx
import jax
from jaxtyping import Array, Bool, Float, PyTree

from ._adjoint import adjoint, tangent
from ._iterate import Outcome
from ._problem import Problem
from ._solution import RESULTS


class Layout(eqx.Module):
    """Where the trajectory lives; `Local` is one device (the other: `_solve_sharded.py`)."""

    def trajectory(self, fn: Callable, problem: Problem, *trajectories: Array) -> Array:
        """`fn(problem, *trajectories) -> (T, D)` trajectory."""
        raise NotImplementedError

    def solve(self, fn: Callable, problem: Problem, *trajectories: Array) -> Outcome:
        """`fn(problem, *trajectories) -> Outcome` (a linear solve)."""
        raise NotImplementedError

    def check(self, out: Outcome) -> Array:
        """`out.states`, raising at run time if the solve did not converge."""
        raise NotImplementedError


class Local(Layout):
    def trajectory(self, fn, problem, *trajectories):
        return fn(problem, *trajectories)

    def solve(self, fn, problem, *trajectories):
        return fn(problem, *trajectories)

    def check(self, out):
        return RESULTS.adjoint_not_converged.error_if(out.states, ~out.converged)


def no_gradient(tree: PyTree) -> PyTree:
    return jax.tree_util.tree_map(
        lambda x: jax.lax.stop_gradient(x) if eqx.is_inexact_array(x) else x, tree
    )


def _evaluate(problem: Problem, states):
    return problem.evaluate(states)


@eqx.filter_custom_jvp
def implicit(problem: Problem, states, *, solver, rtol, atol, throw, layout: Layout = Local()):
    """The identity on `states`, the solution of `problem`; its JVP is the implicit one.

    The iterations run on a copy of `problem` without gradient; this function
    then attaches the derivative of the exact recurrence to their answer.
    """
    del problem, solver, rtol, atol, throw, layout
    return states


@implicit.def_jvp
def _implicit_jvp(primals, tangents, *, solver, rtol, atol, throw, layout: Layout = Local()):
    problem, states = primals
    problem_dot, _ = tangents  # `states` is a solution, not an input: its tangent is unused
    options = dict(solver=solver, rtol=rtol, atol=atol, throw=throw, layout=layout)
    # Calling `implicit` again, not returning `states`, lets an outer JVP (jacfwd of
    # jacrev: hessians) differentiate the solution by this same rule.
    states = implicit(problem, states, **options)
    if not jax.tree_util.tree_leaves(problem_dot):
        return states, None

    diff_mask = jax.tree_util.tree_map(
        lambda t: t is not None, problem_dot, is_leaf=lambda t: t is None
    )
    diff, nondiff = eqx.partition(problem, diff_mask)

    # b_t = ∂f/∂θ(x_t, s*_{t-1}) θ̇. Checkpointed: in reverse mode its transpose (the
    # parameter VJP) recomputes the cell from `states` instead of storing its
    # intermediates at every time step.
    @jax.checkpoint
    def evaluate(d):
        return layout.trajectory(_evaluate, eqx.combine(d, nondiff), states)

    _, rhs = jax.jvp(evaluate, (diff,), (problem_dot,))

    def matvec(delta):  # (I - L) δ, (L δ)_t = A_t δ_{t-1}
        at = lambda s: layout.trajectory(_evaluate, problem, s)
        return delta - jax.jvp(at, (states,), (delta,))[1]

    def solve(_, b):
        fn = lambda p, s, b: tangent(p, s, b, solver, rtol=rtol, atol=atol)
        return check_derivative(layout.solve(fn, problem, states, b), throw, layout)

    def transpose_solve(_, c):
        fn = lambda p, s, c: adjoint(p, s, c, solver, rtol=rtol, atol=atol)
        return check_derivative(layout.solve(fn, problem, states, c), throw, layout)

    delta = jax.lax.custom_linear_solve(matvec, rhs, solve, transpose_solve)
    return states, delta


def check_derivative(
    out: Outcome, throw: bool, layout: Layout = Local()
) -> Float[Array, "T D"] | Bool[Array, ""]:
    if throw:
        return layout.check(out)
    return out.states


@eqx.filter_custom_vjp
def implicit_reverse(problem: Problem, states, solver, rtol, atol, throw, layout=Local()):
    """`implicit` for a cell without forward mode (one holding a `jax.custom_vjp`
    function): the same derivative, transposed only, with the cell's VJPs.

    JAX refuses forward mode through it (`jax.jvp`, `jax.jacfwd`), as it does for
    `lax.scan` of the same cell."""
    del problem, solver, rtol, atol, throw, layout
    return states


@implicit_reverse.def_fwd
def _implicit_reverse_fwd(perturbed, problem, states, solver, rtol, atol, throw, layout=Local()):
    del perturbed, problem, solver, rtol, atol, throw, layout
    return states, None


@implicit_reverse.def_bwd
def _implicit_reverse_bwd(
    residuals, cotangent, perturbed, problem, states, solver, rtol, atol, throw, layout=Local()
):
    del residuals, perturbed
    fn = lambda p, s, c: adjoint(p, s, c, solver, rtol=rtol, atol=atol)
    lam = check_derivative(layout.solve(fn, problem, states, cotangent), throw, layout)
    # θ̄ = Σ_t (∂f_t/∂θ)ᵀ λ_t, for the cell's parameters, the inputs and s_0 at once.
    _, vjp = eqx.filter_vjp(lambda p: layout.trajectory(_evaluate, p, states), problem)
    (problem_bar,) = vjp(lam)
    return problem_bar
