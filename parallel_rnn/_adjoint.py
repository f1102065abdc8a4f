"""Exact reverse-mode derivative of the solve, by the implicit function theorem.

At the solution `s*`, `r(s*, θ) = 0`, so for a cotangent `s̄` of the states the
gradients are `θ̄ = Σ_t (∂f_t/∂θ)ᵀ λ_t` (likewise for the inputs and `s_0`),
where `λ` solves the adjoint recurrence, backwards in time:

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
forward solver and of its iterations.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PyTree

from ._iterate import Outcome, iterate
from ._problem import FlatCell, Problem, make_spec
from ._scan import Method, transposed_recurrence
from ._shard import flip_time, global_length, shift_left, shift_right, time_index, time_max
from ._solver.base import AbstractSolver, Iterate, safeguard
from ._solver.deer import QuasiDEER


class _AdjointCell(eqx.Module):
    """`(x_{t+1}, s*_t, s̄_t, valid_t), λ_{t+1} ↦ s̄_t + A_{t+1}ᵀ λ_{t+1}`."""

    fn: FlatCell

    def __call__(self, inp, lam):
        x_next, s_t, sbar_t, valid = inp
        _, vjp = jax.vjp(lambda s: self.fn(x_next, s), s_t)
        (back,) = vjp(lam)
        return sbar_t + jnp.where(valid, back, 0)

    def diagonal(self, inp, lam):
        del lam
        x_next, s_t, _, valid = inp
        # A and Aᵀ share their diagonal.
        return jnp.where(valid, self.fn.diagonal(x_next, s_t), 0)


def _flip(tree):
    return jax.tree_util.tree_map(flip_time, tree)


class _DenseAdjoint(AbstractSolver):
    """Newton on `λ_t = s̄_t + A_{t+1}ᵀ λ_{t+1}` with the `A_t` held fixed.

    Iterates live in the reversed time of `iterate` (row `k` is `t = T - k`), so
    its frontier and safeguard apply unchanged; `A` and `cotangent` stay in forward
    time and are never flipped or shifted (no copy of the `(T, D, D)` array).
    The residual applies `Aᵀ` by autodiff (`transpose`, one batched VJP), not with
    the stored `A`: a cell's closed-form `value_and_jacobian` only steers the
    Newton steps, so an inexact one costs iterations, never a wrong gradient.
    """

    A: Float[Array, "T D D"]  # A_t = ∂f/∂s(x_t, s*_{t-1}), forward time
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
    T, D = states.shape
    scale = time_max(jnp.max(jnp.abs(cotangent)))
    scale = jnp.where(jnp.isfinite(scale) & (scale > 0), scale, 1).astype(states.dtype)
    cotangent = cotangent / scale
    if solver.jacobian == "dense":
        _, A = problem.linearise_dense(states)
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
    )
    return eqx.tree_at(lambda o: o.states, out, scale * flip_time(out.states))


def _adjoint_problem(
    problem: Problem, states: Float[Array, "T D"], cotangent: Float[Array, "T D"]
) -> Problem:
    """The adjoint recurrence as a cell on reversed time, for the quasi solvers."""
    T, D = states.shape
    x_next = jax.tree_util.tree_map(lambda x: shift_left(x, x[-1]), problem.inputs)
    valid = time_index(T) < global_length(T) - 1
    adj_inputs = _flip((x_next, states, cotangent, valid))

    cell = _AdjointCell(problem.fn)
    has_diag = problem.fn.diag is not None
    flat = FlatCell(cell, cell.diagonal if has_diag else None, make_spec(states[0]))
    return Problem(flat, adj_inputs, jnp.zeros((D,), states.dtype))


def parameter_cotangents(
    problem: Problem, states: Float[Array, "T D"], lam: Float[Array, "T D"]
) -> tuple[PyTree, PyTree, Float[Array, " D"]]:
    """One batched VJP of the cell: cotangents of (flat cell, inputs, `s_0`)."""

    def batched(fn, inputs, init):
        prev = shift_right(states, init)
        return jax.vmap(fn)(inputs, prev)

    _, vjp = eqx.filter_vjp(batched, problem.fn, problem.inputs, problem.init)
    return vjp(lam)
