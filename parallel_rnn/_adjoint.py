"""Exact reverse-mode derivative of the solve, by the implicit function theorem.

At the solution `s*`, `r(s*, θ) = 0`, so for a cotangent `s̄` of the states the
gradients are `θ̄ = Σ_t (∂f_t/∂θ)ᵀ λ_t` (likewise for the inputs and `s_0`),
where `λ` solves the adjoint recurrence, backwards in time:

    λ_T = s̄_T,    λ_t = s̄_t + A_{t+1}ᵀ λ_{t+1},    A_{t+1} = ∂f/∂s(x_{t+1}, s*_t).

That is itself a (linear) recurrence, so it is solved by the same machinery as
the forward pass, on the time-reversed "adjoint cell" `λ ↦ s̄_t + A_{t+1}ᵀ λ`:
with `DEER` (one dense reverse scan; exact in one step because the cell is
linear) for dense solvers, and with `QuasiDEER` (diagonal reverse scans plus one
batched VJP per iteration, `O(T D)` memory) for the others. Either way the
answer is the exact adjoint to the tolerance, independent of the forward solver
and of its iterations.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PyTree

from ._iterate import Outcome, iterate
from ._problem import FlatCell, Problem, make_spec
from ._solver.base import AbstractSolver
from ._solver.deer import DEER, QuasiDEER


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
    return jax.tree_util.tree_map(lambda x: jnp.flip(x, axis=0), tree)


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
    scale = jnp.max(jnp.abs(cotangent))
    scale = jnp.where(jnp.isfinite(scale) & (scale > 0), scale, 1).astype(states.dtype)
    cotangent = cotangent / scale
    x_next = jax.tree_util.tree_map(
        lambda x: jnp.concatenate([x[1:], x[-1:]], axis=0), problem.inputs
    )
    valid = jnp.arange(T) < T - 1
    adj_inputs = _flip((x_next, states, cotangent, valid))

    cell = _AdjointCell(problem.fn)
    has_diag = problem.fn.diag is not None
    flat = FlatCell(cell, cell.diagonal if has_diag else None, make_spec(states[0]))
    adj_problem = Problem(flat, adj_inputs, jnp.zeros((D,), states.dtype))

    adj_solver = (
        DEER(scan=solver.scan) if solver.jacobian == "dense" else QuasiDEER(scan=solver.scan)
    )
    out = iterate(
        adj_problem,
        adj_solver,
        jnp.zeros_like(states),
        rtol=rtol,
        atol=atol,
        max_steps=T,
        trace=False,
    )
    return eqx.tree_at(lambda o: o.states, out, scale * jnp.flip(out.states, axis=0))


def parameter_cotangents(
    problem: Problem, states: Float[Array, "T D"], lam: Float[Array, "T D"]
) -> tuple[PyTree, PyTree, Float[Array, " D"]]:
    """One batched VJP of the cell: cotangents of (flat cell, inputs, `s_0`)."""

    def batched(fn, inputs, init):
        prev = jnp.concatenate([init[None], states[:-1]], axis=0)
        return jax.vmap(fn)(inputs, prev)

    _, vjp = eqx.filter_vjp(batched, problem.fn, problem.inputs, problem.init)
    return vjp(lam)
