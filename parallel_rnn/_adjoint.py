"""Exact derivatives of the solve, by the implicit function theorem.

At the solution `s*`, `r(s*, θ) = 0`. A tangent `θ̇` of everything the cell
depends on gives the tangent `δ = ṡ*` of the trajectory as the solution of the
linearised recurrence, forwards in time (`tangent`):

    δ_t = A_t δ_{t-1} + b_t,    b_t = ∂f/∂θ(x_t, s*_{t-1}) θ̇,    δ_0 = 0

(`ṡ_0` enters through `b_1 ∋ A_1 ṡ_0`). Its transpose is the adjoint recurrence
(`adjoint`): for a cotangent `s̄` of the states the gradients are
`θ̄ = Σ_t (∂f_t/∂θ)ᵀ λ_t` (likewise for the inputs and `s_0`), where `λ` solves,
backwards in time:

    λ_T = s̄_T,    λ_t = s̄_t + A_{t+1}ᵀ λ_{t+1},    A_{t+1} = ∂f/∂s(x_{t+1}, s*_t).

That is itself a (linear) recurrence, so it is solved by the same iteration
loop as the forward pass, in reversed time, with its safeguard and its `T`-step
bound:

- after dense solvers, by Newton with the Jacobians `A_t` computed once
  (`_DenseAdjoint`): each step is one transposed dense reverse scan and one
  batched VJP, and the first step is already exact up to round-off;
- after the others, by `QuasiDEER` on the "adjoint cell" `λ ↦ s̄_t + A_{t+1}ᵀ λ`
  (diagonal reverse scans plus one batched VJP per iteration, `O(T D)` memory).

Either way the answer is the exact adjoint to the tolerance, independent of the
forward solver and of its iterations. The tangent recurrence is solved the same
way, forwards: by `DEER` after dense solvers (Newton on a linear problem: exact
after one step) and by `QuasiDEER` on the "tangent cell" `δ ↦ b_t + A_t δ`
otherwise. `_implicit.py` ties the two together as one `lax.custom_linear_solve`.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._gated import GatedJacobian
from ._iterate import Outcome, iterate
from ._problem import FlatCell, Problem, make_spec
from ._scan import Method, transposed_recurrence
from ._shard import flip_time, global_length, shift_left, time_index, time_max
from ._solver.base import AbstractSolver, Iterate, safeguard
from ._solver.deer import DEER, QuasiDEER


class _AdjointCell(eqx.Module):
    """`(x_{t+1}, s*_t, s̄_t, valid_t), λ_{t+1} ↦ s̄_t + A_{t+1}ᵀ λ_{t+1}`."""

    fn: FlatCell

    def __call__(self, inp, costate):
        x_next, s_t, sbar_t, valid = inp
        _, vjp = jax.vjp(lambda s: self.fn(x_next, s), s_t)
        (back,) = vjp(costate)
        return sbar_t + jnp.where(valid, back, 0)

    def diagonal(self, inp, costate):
        del costate
        x_next, s_t, _, valid = inp
        # A and Aᵀ share their diagonal.
        return jnp.where(valid, self.fn.diagonal(x_next, s_t), 0)


def _flip(tree):
    return jax.tree_util.tree_map(flip_time, tree)


def _unit_scale(x: Float[Array, "T D"]) -> Float[Array, ""]:
    """`max|x|` over the whole (possibly sharded) trajectory, or 1 if 0 or not finite.

    The linear solves run on `x / scale` and scale back, so that `atol` means the
    same thing whatever the size of the right-hand side (see `adjoint`)."""
    scale = time_max(jnp.max(jnp.abs(x)))
    return jnp.where(jnp.isfinite(scale) & (scale > 0), scale, 1).astype(x.dtype)


def _linear_problem(cell, has_diag: bool, inputs, states: Float[Array, "T D"]) -> Problem:
    """`cell` (an adjoint or tangent cell, linear in its state) as a `Problem` from 0."""
    flat = FlatCell(cell, cell.diagonal if has_diag else None, make_spec(states[0]))
    return Problem(flat, inputs, jnp.zeros_like(states[0]))


class _DenseAdjoint(AbstractSolver):
    """Newton on `λ_t = s̄_t + A_{t+1}ᵀ λ_{t+1}` with the `A_t` held fixed.

    Iterates live in the reversed time of `iterate` (row `k` is `t = T - k`), so
    its frontier and safeguard apply unchanged; `A` and `cotangent` stay in forward
    time and are never flipped or shifted (no copy of the `(T, D, D)` array).
    The residual applies `Aᵀ` by autodiff (`transpose`, one batched VJP), not with
    the stored `A`: a cell's closed-form `value_and_jacobian` only steers the
    Newton steps, so an inexact one costs iterations, never a wrong gradient.
    """

    # A_t = ∂f/∂s(x_t, s*_{t-1}), forward time: dense, gated or the declared structure
    A: Array | GatedJacobian
    cotangent: Float[Array, "T D"]  # forward time
    transpose: Callable  # λ ↦ (A_tᵀ λ_t)_t, forward time
    scan: Method
    jacobian = "dense"

    def _f(self, lam_reversed):
        (mu,) = self.transpose(flip_time(lam_reversed))
        return flip_time(self.cotangent + shift_left(mu, jnp.zeros_like(mu[0])))

    def init(self, problem, states):
        del problem
        return Iterate(states, self._f(states), None), None

    def step(self, problem, iterate, state, frontier):
        del problem
        residual = flip_time(iterate.fs - iterate.states)
        delta = flip_time(transposed_recurrence(self.A, residual, method=self.scan))
        states = safeguard(iterate.states + delta, iterate, frontier)
        return Iterate(states, self._f(states), None), state


def adjoint(
    problem: Problem,
    states: Float[Array, "T D"],
    cotangent: Float[Array, "T D"],
    solver: AbstractSolver,
    *,
    rtol: float,
    atol: float,
) -> Outcome:
    """Solve for `λ` (returned as `Outcome.states`, in forward time order).

    `λ` is linear in the cotangent, whose scale is the loss's business (a mean
    over many steps gives tiny cotangents): solving for `s̄ / max|s̄|` and scaling
    back makes `atol` mean the same thing for every loss, instead of accepting
    `λ = 0` whenever all cotangents fall below it.
    """
    T = states.shape[0]
    scale = _unit_scale(cotangent)
    cotangent = cotangent / scale
    if solver.jacobian == "dense":
        _, A = problem.linearise_exact(states)  # dense, or the cell's exact structure
        prev = problem.shift(states)
        _, transpose = jax.vjp(lambda p: jax.vmap(problem.fn)(problem.inputs, p), prev)
        adj_solver = _DenseAdjoint(A, cotangent, transpose, solver.scan)
        adj_problem = problem
    else:
        adj_solver, adj_problem = (
            QuasiDEER(scan=solver.scan),
            _adjoint_problem(problem, states, cotangent),
        )
    out = iterate(
        adj_problem,
        adj_solver,
        jnp.zeros_like(states),
        rtol=rtol,
        atol=atol,
        max_steps=global_length(T),
        trace=False,
        # `_DenseAdjoint` evaluates the adjoint recurrence itself (`adj_problem` is
        # the forward problem); the adjoint cell of the quasi path is certified.
        certify=solver.jacobian != "dense",
    )
    return eqx.tree_at(lambda o: o.states, out, scale * flip_time(out.states))


def _adjoint_problem(
    problem: Problem, states: Float[Array, "T D"], cotangent: Float[Array, "T D"]
) -> Problem:
    """The adjoint recurrence as a cell on reversed time, for the quasi solvers."""
    T = states.shape[0]
    x_next = jax.tree_util.tree_map(lambda x: shift_left(x, x[-1]), problem.inputs)
    valid = time_index(T) < global_length(T) - 1
    adj_inputs = _flip((x_next, states, cotangent, valid))
    has_diag = problem.fn.diag is not None
    return _linear_problem(_AdjointCell(problem.fn), has_diag, adj_inputs, states)


class _TangentCell(eqx.Module):
    """`(x_t, s*_{t-1}, b_t), δ_{t-1} ↦ b_t + A_t δ_{t-1}`: the linearised recurrence."""

    fn: FlatCell

    def __call__(self, inp, delta):
        x_t, s_prev, b_t = inp
        _, jd = jax.jvp(lambda s: self.fn(x_t, s), (s_prev,), (delta,))
        return b_t + jd

    def diagonal(self, inp, delta):
        del delta
        x_t, s_prev, _ = inp
        return self.fn.diagonal(x_t, s_prev)


def tangent(
    problem: Problem,
    states: Float[Array, "T D"],
    rhs: Float[Array, "T D"],
    solver: AbstractSolver,
    *,
    rtol: float,
    atol: float,
) -> Outcome:
    """Solve `δ_t = A_t δ_{t-1} + rhs_t`, `δ_0 = 0` (returned as `Outcome.states`).

    Scaled by `max|rhs|` for the same reason as `adjoint`.
    """
    T = states.shape[0]
    scale = _unit_scale(rhs)
    has_diag = problem.fn.diag is not None
    tan_inputs = (problem.inputs, problem.shift(states), rhs / scale)
    tan_problem = _linear_problem(_TangentCell(problem.fn), has_diag, tan_inputs, states)
    tan_solver = (
        DEER(scan=solver.scan, globalise=False)
        if solver.jacobian == "dense"
        else QuasiDEER(scan=solver.scan)
    )
    out = iterate(
        tan_problem,
        tan_solver,
        jnp.zeros_like(states),
        rtol=rtol,
        atol=atol,
        max_steps=global_length(T),
        trace=False,
    )
    return eqx.tree_at(lambda o: o.states, out, scale * out.states)
