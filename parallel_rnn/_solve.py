"""`solve_parallel`: the public entry point."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PyTree

from ._adjoint import adjoint, parameter_cotangents
from ._iterate import Outcome, iterate
from ._problem import Problem
from ._solution import Solution
from ._solver.base import AbstractSolver
from ._solver.deer import QuasiDEER
from ._structure import flat_cell
from ._tolerance import default_tolerances
from ._validate import (
    check_cell,
    check_guess,
    check_inputs,
    check_options,
    check_state,
)


_NOT_CONVERGED = (
    "solve_parallel did not converge: the residual r_t = s_t - f(x_t, s_{t-1}) is still "
    "above atol + rtol*|s_t| somewhere. Possible causes: NaN or inf in the inputs or "
    "parameters, a cell whose true trajectory overflows, max_steps < T, or a tolerance "
    "below the precision of the dtype. Pass throw=False to get the best iterate with "
    "converged=False (under vmap this error is raised if any sequence fails)."
)
_ADJOINT_NOT_CONVERGED = (
    "the adjoint (backward) solve of solve_parallel did not converge; the gradient is not "
    "reliable. Check the cotangents and parameters for NaN/inf."
)


@eqx.filter_custom_vjp
def _solve(problem: Problem, guess, solver, rtol, atol, max_steps, trace, throw) -> Outcome:
    del throw
    return iterate(problem, solver, guess, rtol=rtol, atol=atol, max_steps=max_steps, trace=trace)


@_solve.def_fwd
def _solve_fwd(perturbed, problem, guess, solver, rtol, atol, max_steps, trace, throw):
    del perturbed
    out = _solve.fn(problem, guess, solver, rtol, atol, max_steps, trace, throw)
    return out, out.states


@_solve.def_bwd
def _solve_bwd(
    states, grad_obj, perturbed, problem, guess, solver, rtol, atol, max_steps, trace, throw
):
    del perturbed, guess, max_steps, trace
    cotangent = grad_obj.states
    if cotangent is None:
        return jax.tree_util.tree_map(lambda _: None, problem)
    adj = adjoint(problem, states, cotangent, solver, rtol=rtol, atol=atol)
    lam = adj.states
    if throw:
        lam = eqx.error_if(lam, ~adj.converged, _ADJOINT_NOT_CONVERGED)
    fn_bar, inputs_bar, init_bar = parameter_cotangents(problem, states, lam)
    return Problem(fn_bar, inputs_bar, init_bar)


@eqx.filter_jit
def solve_parallel(
    cell: Callable,
    inputs: PyTree,
    init_state: PyTree,
    solver: AbstractSolver = QuasiDEER(),
    *,
    guess: PyTree | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int | None = None,
    throw: bool = True,
    trace: bool = False,
) -> Solution:
    """Evaluate the recurrence `s_t = cell(x_t, s_{t-1})`, `t = 1..T`, in parallel over `t`.

    The trajectory is found as the root of `r_t = s_t - cell(x_t, s_{t-1})` by
    `solver`, whose every iteration is a parallel linear recurrence.

    **Arguments:**

    - `cell`: any callable `cell(input_t, state) -> new_state` (Equinox's argument
      order: `eqx.nn.GRUCell`, `eqx.nn.LSTMCell` work unchanged). If it has a method
      `diagonal_jacobian(input_t, state)`, the quasi solvers use it; if it has
      `value_and_jacobian(input_t, state) -> (new_state, (D, D) array)`, the dense
      solvers use it instead of `jax.jacfwd`.
    - `inputs`: pytree whose leaves share the leading time axis `T >= 1`.
    - `init_state`: `s_0`, a pytree of floating arrays (one dtype).
    - `solver`: a solver configuration: `DEER()`, `QuasiDEER()` (the default:
      `O(T D)` work and memory per iteration, and in the measured studies as
      robust as the damped `QuasiELK()` at a fraction of its cost per iteration),
      `ELK()` (for unstable or chaotic cells), `QuasiELK()`, `Picard()`, `Jacobi()`.
    - `guess`: initial trajectory (pytree like `Solution.states`), e.g. the previous
      training step's solution. Defaults to `init_state` repeated. Gets no gradient.
    - `rtol`, `atol`: converged when `|r_t| <= atol + rtol |s_t|` elementwise for
      every `t`. Defaults: `1e-5` for float32, `1e-10` for float64.
    - `max_steps`: iteration cap, default `T` (every solver converges within `T`).
    - `throw`: if True, a solve that does not converge raises a runtime error (under
      `vmap`: if any sequence fails). If False, check `Solution.converged`.
    - `trace`: if True, record the residual after every iteration in `Solution.trace`.

    **Returns:** a [`parallel_rnn.Solution`][]. The states are always finite.

    Reverse-mode differentiable (`jax.grad`, `eqx.filter_grad`) with respect to the
    cell's parameters, `inputs` and `init_state`: the gradient is that of the exact
    recurrence (implicit function theorem), computed by an adjoint linear recurrence
    in parallel, not by differentiating the iterations. Forward mode is not supported.
    """
    if not isinstance(solver, AbstractSolver):
        raise TypeError(f"`solver` must be a parallel_rnn solver (e.g. DEER()); got {solver!r}")
    check_options(rtol, atol, max_steps)
    T = check_inputs(inputs)
    spec = check_state(init_state)
    x_0 = jax.tree_util.tree_map(lambda x: x[0], inputs)
    check_cell(cell, x_0, init_state)
    default_rtol, default_atol = default_tolerances(spec.dtype)
    rtol = default_rtol if rtol is None else float(rtol)
    atol = default_atol if atol is None else float(atol)
    max_steps = T if max_steps is None else max_steps

    s0 = spec.ravel(init_state)
    if guess is None:
        guess_flat = jnp.broadcast_to(s0, (T, spec.size))
    else:
        check_guess(guess, init_state, T)
        guess_flat = spec.ravel_trajectory(guess)
    guess_flat = jax.lax.stop_gradient(guess_flat)

    problem = Problem(flat_cell(cell, x_0, init_state, spec), inputs, s0)
    out = _solve(problem, guess_flat, solver, rtol, atol, max_steps, trace, throw)
    states = out.states
    if throw:
        states = eqx.error_if(states, ~out.converged, _NOT_CONVERGED)
    return Solution(
        spec.unravel_trajectory(states), out.num_steps, out.converged, out.residual, out.trace
    )
