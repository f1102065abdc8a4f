"""The iteration loop shared by the forward solve and the adjoint solve."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from ._bounded import finish_sequentially, keep_iterating, may_start
from ._polish import polish_states
from ._problem import Problem
from ._sequential import solve_sequential
from ._shard import globalise_status, lockstep
from ._solution import RESULTS
from ._solver.base import AbstractSolver, Iterate


class Status(eqx.Module):
    """Convergence bookkeeping of one iterate, all computed from `states - fs`."""

    converged: Bool[Array, ""]
    frontier: Int[Array, ""]  # first time index whose residual is out of tolerance
    residual: Float[Array, ""]  # max-norm of the residual (inf if not finite)
    stalled: Bool[Array, ""]  # f is not finite right after the converged prefix


def assess(iterate: Iterate, rtol: float, atol: float) -> Status:
    r = jnp.abs(iterate.states - iterate.fs)
    ok = jnp.all(r <= atol + rtol * jnp.abs(iterate.states), axis=1)  # NaN -> not ok
    converged = jnp.all(ok)
    frontier = jnp.argmin(ok).astype(jnp.int32)
    residual = jnp.max(jnp.where(jnp.isnan(r), jnp.inf, r))
    # The prefix before `frontier` is exact; if f of it is not finite, the true
    # trajectory itself is not (NaN inputs, overflow), and no iteration can help.
    stalled = ~converged & ~jnp.all(jnp.isfinite(iterate.fs[frontier]))
    return globalise_status(Status(converged, frontier, residual, stalled), iterate.fs)


def _with_residual(it: Iterate, status: Status) -> Iterate:
    """`it` carrying the loop's max-norm residual, for the next step to read."""
    return Iterate(it.states, it.fs, it.jac, status.residual)


def _unshared(problem: Problem, n: Int[Array, ""]) -> Problem:
    """`problem` with `0` added to the cell's parameters, a `0` that XLA cannot prove.

    Otherwise XLA shares the certifying evaluation's input projection (`W_ih x_t`
    of all T steps, T×3D for a GRU) with the first linearisation's and keeps that
    copy alive through the whole loop, beside the bias-added one the loop uses:
    3·T·D·4 bytes of peak memory for a GRU, to save one cheap matrix product. The
    loop's step count `n` is never negative, which XLA does not know (an
    `optimization_barrier` on the inputs was tried: XLA:CPU drops it before CSE).
    """
    zero = jnp.where(n < 0, 1, 0)
    dynamic, static = eqx.partition(problem.fn, eqx.is_inexact_array)
    dynamic = jax.tree_util.tree_map(lambda a: a + zero.astype(a.dtype), dynamic)
    return Problem(eqx.combine(dynamic, static), problem.inputs, problem.init)


class Outcome(eqx.Module):
    states: Float[Array, "T D"]
    num_steps: Int[Array, ""]
    converged: Bool[Array, ""]
    residual: Float[Array, ""]
    trace: Float[Array, " max_steps"] | None
    result: RESULTS
    error_estimate: Float[Array, ""] | None = None
    sequential_steps: Int[Array, ""] | None = None


def iterate(
    problem: Problem,
    solver: AbstractSolver,
    guess: Float[Array, "T D"],
    *,
    rtol: float,
    atol: float,
    max_steps: int,
    trace: bool,
    certify: bool = True,
    polish: bool = False,
    switch_cost: float | None = None,
) -> Outcome:
    """Run `solver` from `guess` until the residual meets the tolerance.

    Stops after `max_steps` iterations, or as soon as no progress is possible.
    With `certify`, the returned `converged` and `residual` come from one more
    evaluation of `problem.evaluate` (the plain cell) on the final states: the
    solver's own `fs` may come from a fused `value_and_*` method of the cell,
    which may steer the iteration but must not vouch for its answer. (Pass
    `certify=False` only when the solver's `fs` *is* the problem's function.)

    `switch_cost` (bounded mode, `_bounded.py`): the cost of one iteration in
    sequential cell steps. Iterations run only while they can still pay; the
    unconverged suffix is then finished by an exact sequential pass.
    `polish` (`_polish.py`): estimate the distance to the exact trajectory with one
    exact linearised correction, and apply it when the certified residual allows.
    """
    T = guess.shape[0]
    if switch_cost is not None and not may_start(switch_cost, T):
        # Not even the first linearisation and one iteration (2c) can pay: the
        # sequential scan. Its states are exact up to round-off, so there is
        # nothing to polish (estimate 0).
        states = solve_sequential(problem.fn, problem.inputs, problem.init)
        zero = jnp.array(0, jnp.int32)
        history = jnp.full((max_steps,), jnp.nan, guess.dtype) if trace else None
        out = _certified(
            problem, solver, states, zero, None, history, rtol, atol, False,
            sequential=jnp.array(T, jnp.int32),
        )  # fmt: skip
        estimate = jnp.zeros((), guess.dtype) if polish else None
        return eqx.tree_at(lambda o: o.error_estimate, out, estimate, is_leaf=lambda x: x is None)
    # With certification the loop aims at half the tolerance: a fused
    # `value_and_*` may differ from the plain cell by a few ulps, and at float32's
    # default tolerance (32·eps) that alone would leave a solve that met the
    # tolerance by the fused values just outside it by the cell's own.
    margin = 0.5 if certify else 1.0
    loop_rtol, loop_atol = margin * rtol, margin * atol
    it, solver_state = solver.init(problem, guess)
    status = assess(it, loop_rtol, loop_atol)
    it = _with_residual(it, status)
    history = jnp.full((max_steps,), jnp.nan, guess.dtype) if trace else None

    def cond(carry):
        _, _, n, status, _ = carry
        go = ~status.converged & ~status.stalled & (n < max_steps)
        if switch_cost is not None:
            go = go & keep_iterating(switch_cost, n, T - status.frontier)
        return go

    def body(carry):
        it, solver_state, n, status, history = carry
        it, solver_state = solver.step(problem, it, solver_state, status.frontier)
        status = assess(it, loop_rtol, loop_atol)
        it = _with_residual(it, status)
        if history is not None:
            history = history.at[n].set(status.residual.astype(history.dtype))
        return it, solver_state, n + 1, status, history

    carry = (it, solver_state, jnp.array(0, jnp.int32), status, history)
    it, _, n, status, history = lax.while_loop(*lockstep(cond, body), carry)
    if switch_cost is not None:
        finish = ~status.converged & ~status.stalled
        sequential = jnp.where(finish, T - status.frontier, 0).astype(jnp.int32)
        states = finish_sequentially(problem, it.states, jnp.where(finish, status.frontier, T))
        return _certified(
            problem, solver, states, n, status, history, rtol, atol, polish, sequential
        )
    if certify:
        return _certified(problem, solver, it.states, n, status, history, rtol, atol, polish)
    return Outcome(
        it.states, n, status.converged, status.residual, history, _result(status, status)
    )


def _result(final: Status, loop: Status | None) -> RESULTS:
    if loop is None:
        loop = final
    return RESULTS.where(
        final.converged,
        RESULTS.successful,
        RESULTS.where(
            loop.converged,
            RESULTS.not_certified,
            RESULTS.where(loop.stalled, RESULTS.nonfinite, RESULTS.max_steps_reached),
        ),
    )


def _certified(
    problem: Problem,
    solver: AbstractSolver,
    states: Float[Array, "T D"],
    n: Int[Array, ""],
    loop: Status | None,
    history,
    rtol: float,
    atol: float,
    polish: bool,
    sequential: Int[Array, ""] | None = None,
) -> Outcome:
    """The outcome with `converged`/`residual` from the cell's own `__call__`."""
    certifier = _unshared(problem, n)
    final_fs = certifier.evaluate(states)
    final = assess(Iterate(states, final_fs, None), rtol, atol)
    estimate = None
    if polish:
        states, final, estimate = polish_states(
            problem,
            solver,
            states,
            final_fs,
            final,
            lambda it: assess(it, rtol, atol),
            certifier,
            rtol,
            atol,
            # Only a solve that stopped because it met the tolerance (by the solver's
            # own values) or was finished sequentially; not one capped by max_steps.
            final.converged | (True if loop is None else loop.converged),
        )
    if loop is None or sequential is not None:
        # A sequential finish makes the loop's own status moot: the states are exact
        # unless the true trajectory is not finite.
        loop = final if loop is None else eqx.tree_at(lambda s: s.converged, loop, final.converged)
    return Outcome(
        states,
        n,
        final.converged,
        final.residual,
        history,
        _result(final, loop),
        estimate,
        sequential,
    )
