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

On CPU, where the recurrence runs sequentially anyway, the Newton step runs in
the time chunks of the batched evaluations (`_chunked_newton_step`), so that the
exact Jacobians of all `T` steps never exist at once.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from ._problem import Problem, _chunk_length
from ._scan import linear_recurrence, resolve_method
from ._shard import sequence_axis
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
    if _exact(problem, solver):
        _, jac = problem.linearise_exact(states)
        return linear_recurrence(jac, rhs, method=solver.scan)
    # Solvers that keep `O(T·D)` memory on a dense cell: the same linear recurrence,
    # matrix-free, by the quasi-Newton iterations of the forward-mode derivative.
    from ._adjoint import tangent

    out = tangent(problem, states, rhs, solver, rtol=rtol, atol=atol)
    return jnp.where(out.converged, out.states, jnp.nan)


def _exact(problem: Problem, solver: AbstractSolver) -> bool:
    """Whether `correction` uses the exact Jacobians (else the matrix-free tangent)."""
    # (A cell without forward mode, a custom_vjp inside, has no matrix-free JVP path.)
    dense = solver.jacobian == "dense"
    return dense or _cheap_exact_jacobian(problem) or not problem.fn.forward_mode


def _time_chunk(problem: Problem, solver: AbstractSolver, T: int) -> int | None:
    """Time steps per chunk of the polish's Newton step, or `None` for whole arrays:
    chunks where the correction's recurrence runs sequentially anyway (CPU,
    unsharded), on the exact Jacobians, and `T` is long (`_problem._chunk_length`)."""
    if (
        sequence_axis() is not None
        or resolve_method(solver.scan) != "sequential"
        or not _exact(problem, solver)
    ):
        return None
    return _chunk_length(T, problem.init.shape[0])


def _newton_step(
    problem: Problem,
    solver: AbstractSolver,
    certifier: Problem,
    states: Float[Array, "T D"],
    fs: Float[Array, "T D"],
    rtol: float,
    atol: float,
):
    """`(candidate, f at it, max|δ|, max|candidate|)` of one exact Newton step
    `candidate = states + δ`, the cell evaluated by `certifier` (in one pass `δ` is
    zeroed where not finite; either way such a step is refused by the caller)."""
    b = _time_chunk(problem, solver, states.shape[0])
    if b is not None:
        return _chunked_newton_step(problem, certifier, states, fs, b)
    delta = correction(problem, solver, states, fs, rtol, atol)
    size = max_abs(delta)
    candidate = states + jnp.where(jnp.isfinite(size), delta, 0)
    return candidate, certifier.evaluate(candidate), size, max_abs(candidate)


def _chunked_newton_step(
    problem: Problem,
    certifier: Problem,
    states: Float[Array, "T D"],
    fs: Float[Array, "T D"],
    b: int,
):
    """`_newton_step` in one `lax.scan` over chunks of `b` time steps.

    Each chunk linearises only its own steps (from its inputs and the previous
    chunk's last state), runs their recurrence from the previous chunk's last `δ`
    (the same products in the same order as one pass), forms the candidate and
    evaluates the cell on it (from the previous chunk's last candidate). So the
    exact Jacobians (for a gated cell coefficients `T × K·D` and blocks), the
    linearisation's temporaries (input projection, gates), `rhs` and `δ` exist one
    chunk at a time: whole arrays are only the candidate and its evaluation. Where
    `δ` is not finite the candidate here is `states + δ`, not `states`: the step
    is refused then (`usable`), so it is never used.
    """
    T, D = states.shape

    def chunk(carry, xs):
        i, prev, delta_prev, cand_prev, size, largest, cand_out, fs_out = carry
        inputs, s, f = xs
        _, jac = Problem(problem.fn, inputs, prev).linearise_exact(s)
        delta = linear_recurrence(jac, f - s, method="sequential", initial=delta_prev)
        cand = s + delta
        cand_fs = Problem(certifier.fn, inputs, cand_prev).evaluate(cand)
        size = jnp.maximum(size, max_abs(delta))
        largest = jnp.maximum(largest, max_abs(cand))
        cand_out = lax.dynamic_update_slice_in_dim(cand_out, cand, i * b, 0)
        fs_out = lax.dynamic_update_slice_in_dim(fs_out, cand_fs, i * b, 0)
        return (i + 1, s[-1], delta[-1], cand[-1], size, largest, cand_out, fs_out), None

    # The outputs are written into copies of `fs`, not stacked by the scan: XLA
    # builds a scan's stacked outputs from a zero array that it shares with every
    # other scan of that shape (the solver loop's chunked evaluations) and copies
    # before the solver loop, where the copies would stay alive through it.
    split = lambda a: a.reshape(T // b, b, *a.shape[1:])  # noqa: E731
    zero = jnp.zeros((), states.dtype)
    i0 = jnp.zeros((), jnp.int32)
    init = (i0, problem.init, jnp.zeros_like(problem.init), problem.init, zero, zero, fs, fs)
    xs = jax.tree_util.tree_map(split, (problem.inputs, states, fs))
    (*_, size, largest, candidate, cand_fs), _ = lax.scan(chunk, init, xs)
    return candidate, cand_fs, size, largest


def polish_states(
    problem: Problem,
    solver: AbstractSolver,
    states: Float[Array, "T D"],
    fs: Float[Array, "T D"],
    status,
    assess: Callable,
    certifier: Problem,
    rtol: float,
    atol: float,
    may_apply: Array,
):
    """`(states, status, error_estimate)`: polished where that keeps the certificate.

    `certifier` is the problem whose `evaluate` certifies a candidate (the plain
    cell). `may_apply` is False when the solve stopped short (at `max_steps`, or
    with no progress possible): the estimate is still reported, but the states stay
    where the iterations left them, so a capped solve is reported as capped.

    When the answer is far off (a damped solver stopped at the tolerance on a long
    marginal trajectory), the first step's second-order term can leave the residual
    just above the tolerance: a second Newton step from there is taken (skipped by
    `lax.cond` when not needed, outside `vmap`) before giving up.
    """

    def newton(s, f):
        # Sizes over the whole trajectory when it is sequence-sharded: every shard
        # must take the same branch of the `lax.cond` below (it holds collectives).
        candidate, cand_fs, size, largest = _newton_step(
            problem, solver, certifier, s, f, rtol, atol
        )
        usable = jnp.isfinite(size) & (largest <= _explosion_bound(states.dtype))
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
