"""The error estimate and the Newton polish applied after every solve.

A converged residual `r` says each step is right to the tolerance, not that the
trajectory is: along a marginally stable trajectory (largest Lyapunov exponent
near 0) per-step errors add up. To first order the distance to the exact
trajectory is the correction `δ` of one exact Newton step,

    δ_t = A_t δ_{t-1} - r_t,     A_t = ∂f/∂s(x_t, s_{t-1}),

one linear recurrence with the exact Jacobians (in the cell's structured or gated
form where it has one). `max|δ|` is reported as the error estimate, and `s + δ`
replaces the states when its certified residual allows (still within tolerance
when the solve had converged, smaller otherwise). The estimate is first order: it
is reliable where the Newton step is (contractive and marginally stable cells
near their solution) and meaningless on chaotic cells, whose exact trajectory is
itself sensitive to every rounding (there `δ` is large, the polished residual
larger, and the polish is refused).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from ._problem import Problem
from ._scan import linear_recurrence
from ._solver.base import AbstractSolver, Iterate, _explosion_bound, max_abs


def _cheap_exact_jacobian(problem: Problem) -> bool:
    """The exact Jacobians take `O(T·D·K)` memory (declared structure or gated form)."""
    return problem.fn.structure in ("diagonal", "block") or problem.fn.gated is not None


def correction(
    problem: Problem,
    solver: AbstractSolver,
    states: Float[Array, "T D"],
    fs: Float[Array, "T D"],
    rtol: float,
    atol: float,
) -> Float[Array, "T D"]:
    """One exact Newton correction `δ` at `states` (`fs`: the cell evaluated there)."""
    rhs = fs - states
    # (A cell without forward mode, a custom_vjp inside, has no matrix-free JVP path.)
    if solver.jacobian == "dense" or _cheap_exact_jacobian(problem) or not problem.fn.forward_mode:
        _, jac = problem.linearise_exact(states)
        return linear_recurrence(jac, rhs, method=solver.scan)
    # Solvers that keep `O(T·D)` memory on a dense cell: the same linear recurrence,
    # matrix-free, by the quasi-Newton iterations of the forward-mode derivative.
    from ._adjoint import tangent

    out = tangent(problem, states, rhs, solver, rtol=rtol, atol=atol)
    return jnp.where(out.converged, out.states, jnp.nan)


def polish_states(
    problem: Problem,
    solver: AbstractSolver,
    states: Float[Array, "T D"],
    fs: Float[Array, "T D"],
    status,
    assess: Callable,
    evaluate: Callable,
    rtol: float,
    atol: float,
    may_apply: Array,
):
    """`(states, status, error_estimate)`: polished where that keeps the certificate.

    `may_apply` is False when the solve stopped short (at `max_steps`, or with no
    progress possible): the estimate is still reported, but the states stay where
    the iterations left them, so a capped solve is reported as capped.

    When the answer is far off (a damped solver stopped at the tolerance on a long
    marginal trajectory), the first step's second-order term can leave the residual
    just above the tolerance: a second Newton step from there is taken (skipped by
    `lax.cond` when not needed, outside `vmap`) before giving up.
    """

    def newton(s, f):
        delta = correction(problem, solver, s, f, rtol, atol)
        # Over the whole trajectory when it is sequence-sharded: every shard must
        # take the same branch of the `lax.cond` below (it holds collectives).
        size = max_abs(delta)
        candidate = s + jnp.where(jnp.isfinite(size), delta, 0)
        largest = max_abs(candidate)
        usable = jnp.isfinite(size) & (largest <= _explosion_bound(states.dtype))
        cand_fs = evaluate(candidate)
        return candidate, cand_fs, assess(Iterate(candidate, cand_fs, None)), usable, size

    def better(new):
        return jnp.where(status.converged, new.converged, new.residual < status.residual)

    first, first_fs, first_status, usable, size = newton(states, fs)
    accept = may_apply & usable & better(first_status)
    best_status = _select(accept, first_status, status)

    def again(_):
        second, _, second_status, ok, _ = newton(first, first_fs)
        improves = jnp.where(
            best_status.converged,
            second_status.converged & (second_status.residual < best_status.residual),
            second_status.converged | (second_status.residual < best_status.residual),
        )
        return second, second_status, ok & improves

    def skip(_):
        return first, first_status, jnp.zeros((), bool)

    second, second_status, accept2 = lax.cond(
        may_apply & usable & ~first_status.converged, again, skip, None
    )
    out_states = jnp.where(accept2, second, jnp.where(accept, first, states))
    out_status = _select(accept2, second_status, best_status)
    estimate = jnp.where(usable, size, jnp.inf).astype(states.dtype)
    return out_states, out_status, estimate


def _select(pred: Array, a, b):
    return jax.tree_util.tree_map(lambda x, y: jnp.where(pred, x, y), a, b)
