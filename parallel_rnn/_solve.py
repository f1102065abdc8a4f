"""`solve_parallel`: the public entry point."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PyTree

from ._cost import check_bounded, switch_cost
from ._implicit import (
    implicit as _implicit,
    implicit_reverse as _implicit_reverse,
    no_gradient as _no_gradient,
)
from ._iterate import iterate
from ._problem import Problem
from ._solution import RESULTS, Solution
from ._solver.base import AbstractSolver
from ._solver.deer import DEER
from ._structure import flat_cell, registered_rule
from ._tolerance import default_tolerances
from ._validate import (
    check_cell,
    check_guess,
    check_inputs,
    check_state,
    normalise_options,
)


def solve_parallel(
    cell: Callable,
    inputs: PyTree,
    init_state: PyTree,
    solver: AbstractSolver = DEER(),
    *,
    guess: PyTree | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int | None = None,
    throw: bool = True,
    trace: bool = False,
    polish: bool = True,
    bounded: bool | float = False,
) -> Solution:
    """Evaluate the recurrence `s_t = cell(x_t, s_{t-1})`, `t = 1..T`, in parallel over `t`.

    The trajectory is found as the root of `r_t = s_t - cell(x_t, s_{t-1})` by
    `solver`, whose every iteration is a parallel linear recurrence.

    **Arguments:**

    - `cell`: any callable `cell(input_t, state) -> new_state` (Equinox's argument
      order: `eqx.nn.GRUCell`, `eqx.nn.LSTMCell` work unchanged). If it has a method
      `diagonal_jacobian(input_t, state)`, the quasi solvers use it; if it has
      `value_and_jacobian(input_t, state) -> (new_state, (D, D) array)`, the dense
      solvers use it instead of `jax.jacfwd`; `value_and_gated_jacobian` (a
      `GatedJacobian`, as the GRU and LSTM cells give) lets `DEER` store the
      Jacobians in `O(T D K)` instead (docs/cells.md).
    - `inputs`: pytree whose leaves share the leading time axis `T >= 1`.
    - `init_state`: `s_0`, a pytree of floating arrays (one dtype).
    - `solver`: a solver configuration: `DEER()` (the default: globalised Newton,
      the fewest iterations in the measured studies, trained language models from a
      cold start included; `O(T D²)` memory, `O(T D)` on gated cells),
      `QuasiDEER()` (`O(T D)` memory, for large `D`), `ELK()` (for unstable,
      chaotic or marginally stable cells), `QuasiELK()`, `Picard()`, `Jacobi()`.
    - `guess`: initial trajectory (pytree like `Solution.states`), e.g. the previous
      training step's solution. Defaults to `init_state` repeated. Gets no gradient.
      Non-finite entries of the guess are replaced by those of `init_state` (or `0`
      where `init_state` itself is not finite), so the returned states are finite
      whatever the guess.
    - `rtol`, `atol`: converged when `|r_t| <= atol + rtol |s_t|` elementwise for
      every `t`. Defaults: `32·eps` ≈ `3.8e-6` for float32, `1e-10` for float64. Python or NumPy
      scalars (static: a new value recompiles).
    - `max_steps`: iteration cap (Python or NumPy integer), default `T` (every
      solver converges within `T`).
    - `throw`: if True, a solve that does not converge raises a runtime error whose
      message depends on `Solution.result` (under `vmap`: if any sequence fails).
      If False, check `Solution.converged` and `Solution.result`. Inside `jax.jit`
      the message is part of the `JaxRuntimeError`'s text; use `eqx.filter_jit`
      for a clean `EquinoxRuntimeError`, or `throw=False` and `Solution.result`.
    - `trace`: if True, record the residual after every iteration in `Solution.trace`.
    - `polish`: after the iterations, take one exact Newton correction `δ` at the
      final states: `max|δ|` is reported as `Solution.error_estimate` (a first-order
      estimate of the distance to the exact trajectory), and the corrected states are
      returned when their certified residual allows (docs/accuracy.md); not after a
      solve stopped by `max_steps`, which stays reported as such. Costs about one
      iteration of `DEER` (a second Newton step when the first leaves the residual
      just above the tolerance); not counted in `num_steps`. Default True.
    - `bounded`: the bounded mode (docs/when-parallel-pays.md). `False` (default):
      iterate until converged or `max_steps`. `True`: run parallel iterations only
      while, by the cost model of this backend, they can still beat finishing
      sequentially, then finish the unconverged suffix with an exact sequential pass
      (`Solution.sequential_steps` says how many steps); the total cost is at most
      about twice the cheaper of pure parallel and pure sequential evaluation. A
      number: the cost of one iteration in sequential cell steps (e.g. from
      `prnn.calibrate`), instead of the backend's default.

    **Returns:** a [`parallel_rnn.Solution`][]. The states are always finite, and
    `converged`/`residual` are certified by one evaluation of the cell's own
    `__call__` on them.

    Differentiable in reverse mode (`jax.grad`, `jax.vjp`, `eqx.filter_grad`) and in
    forward mode (`jax.jvp`, `jax.linearize`, `jax.jacfwd`, `jax.hessian`) with
    respect to the cell's parameters, `inputs` and `init_state`: the derivative is
    that of the exact recurrence (implicit function theorem), one linear recurrence
    solved in parallel (forwards for tangents, backwards for cotangents), not a
    derivative of the iterations. A cell holding a `jax.custom_vjp` function has
    reverse mode only (its Jacobians come from VJPs); forward mode then raises
    JAX's `TypeError` ("can't apply forward-mode autodiff (jvp) to a custom_vjp
    function"), as it does through `lax.scan`.
    """
    if not isinstance(solver, AbstractSolver):
        raise TypeError(f"`solver` must be a parallel_rnn solver (e.g. DEER()); got {solver!r}")
    # Before the jit boundary, where NumPy scalars are still concrete.
    rtol, atol, max_steps = normalise_options(rtol, atol, max_steps)
    bounded = check_bounded(bounded)
    # The registry is read here, not while tracing: the closed forms registered for
    # the cell's class are a static argument, so a new registration recompiles.
    registered = registered_rule(cell)
    return _solve_parallel(
        cell,
        inputs,
        init_state,
        solver,
        guess,
        rtol,
        atol,
        max_steps,
        bool(throw),
        bool(trace),
        bool(polish),
        bounded,
        registered,
    )


@eqx.filter_jit
def _solve_parallel(
    cell,
    inputs,
    init_state,
    solver,
    guess,
    rtol,
    atol,
    max_steps,
    throw,
    trace,
    polish,
    bounded,
    registered,
) -> Solution:
    T = check_inputs(inputs)
    spec = check_state(init_state)
    x_0 = jax.tree_util.tree_map(lambda x: x[0], inputs)
    check_cell(cell, x_0, init_state, inputs=inputs)
    default_rtol, default_atol = default_tolerances(spec.dtype)
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    max_steps = T if max_steps is None else max_steps

    s0 = spec.ravel(init_state)
    if guess is None:
        guess_flat = jnp.broadcast_to(s0, (T, spec.size))
    else:
        check_guess(guess, init_state, T)
        guess_flat = spec.ravel_trajectory(guess)
    # The solvers' safeguard keeps every iterate finite given a finite start; a NaN
    # init_state (the default guess repeats it) or a NaN row of a user's guess would
    # otherwise come back unchanged wherever the solve stops early.
    fallback = jnp.where(jnp.isfinite(s0), s0, 0)
    guess_flat = jax.lax.stop_gradient(jnp.where(jnp.isfinite(guess_flat), guess_flat, fallback))

    problem = Problem(flat_cell(cell, x_0, init_state, spec, registered), inputs, s0)
    out = iterate(
        _no_gradient(problem),
        solver,
        guess_flat,
        rtol=rtol,
        atol=atol,
        max_steps=max_steps,
        trace=trace,
        polish=polish,
        switch_cost=switch_cost(bounded, solver, T, spec.size),
    )
    if problem.fn.forward_mode:
        states = _implicit(problem, out.states, solver=solver, rtol=rtol, atol=atol, throw=throw)
    else:
        states = _implicit_reverse(problem, out.states, solver, rtol, atol, throw)
    if throw:
        states = out.result.error_if(states, out.result != RESULTS.successful)
    return Solution(
        spec.unravel_trajectory(states),
        out.num_steps,
        out.converged,
        out.residual,
        out.trace,
        out.result,
        out.error_estimate,
        out.sequential_steps,
    )
