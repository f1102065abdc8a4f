"""The result of `solve_parallel`, and why a solve stopped."""

import equinox as eqx
from jaxtyping import Array, Bool, Float, Int, PyTree


class RESULTS(eqx.Enumeration):
    """Why a solve stopped: the `result` of a [`parallel_rnn.Solution`][].

    Compare with `==` (works under `jit` and `vmap`):
    `sol.result == prnn.RESULTS.successful`. `RESULTS[sol.result]` is the message
    (outside `jit`, for a scalar result).
    """

    successful = ""
    max_steps_reached = (
        "solve_parallel did not converge within `max_steps` iterations: the residual "
        "r_t = s_t - f(x_t, s_{t-1}) is still above atol + rtol*|s_t| somewhere. Every "
        "solver converges within T iterations, so either max_steps < T or the tolerance "
        "is below what the dtype can resolve (round-off keeps the residual above it). "
        "Raise max_steps or the tolerance; pass throw=False to get the best iterate with "
        "converged=False and inspect `Solution.result`."
    )
    nonfinite = (
        "solve_parallel did not converge: no progress possible. The cell returned a non-finite "
        "value (NaN or inf) at the first time step that is not yet solved, although "
        "everything before it is exact, so the true trajectory itself is not finite "
        "there: NaN/inf in the inputs, the parameters or init_state, a trajectory that "
        "overflows, or a cell that signals failure with NaN (ImplicitSSM when its inner "
        "solve fails). The returned states are finite: the exact prefix, then the last "
        "finite iterate."
    )
    not_certified = (
        "solve_parallel did not converge: the iteration stopped as converged, but the "
        "residual recomputed with the cell's own __call__ on the final states does not "
        "meet the tolerance. The cell's fused methods (value_and_jacobian, "
        "value_and_diagonal_jacobian) return a value that differs from __call__, and "
        "only __call__ defines the recurrence: fix the fused method so that it "
        "returns exactly cell(x, s)."
    )
    adjoint_not_converged = (
        "the derivative of solve_parallel is not reliable: the linear recurrence for the "
        "tangent (forward mode) or the adjoint (reverse mode) did not converge. Check "
        "the tangents, cotangents and parameters for NaN/inf, and the forward solve's "
        "`result`."
    )


class Solution(eqx.Module):
    """What `solve_parallel` returns.

    **Attributes:**

    - `states`: the trajectory `s_1..s_T`, a pytree like `init_state` whose leaves
      have a leading time axis `T`. Always finite.
    - `num_steps`: int32 scalar, iterations used (under `vmap`, one per sequence).
    - `converged`: bool scalar, True only if `|r_t| <= atol + rtol |s_t|` holds
      elementwise for every `t`, where `r_t = s_t - f(x_t, s_{t-1})` is recomputed
      with the cell's own `__call__` on the returned `states` (certified: a fused
      `value_and_*` method of the cell only steers the iterations).
    - `residual`: max-norm of that `r` (`inf` if it is not finite).
    - `trace`: with `trace=True`, shape `(max_steps,)`: the max-norm residual after
      each iteration (as seen by the solver), NaN past the last one; otherwise `None`.
    - `result`: a [`parallel_rnn.RESULTS`][] item, why the solve stopped:
      `successful` (exactly when `converged`), `max_steps_reached`, `nonfinite` (no
      progress possible: the cell is not finite on the exact prefix) or
      `not_certified` (the solver's fused cell evaluation disagrees with `__call__`).
    - `error_estimate`: with `polish=True` (the default), `max_t |δ_t|` for the
      exact Newton correction `δ` at the states the solver stopped at: a
      first-order estimate of their max-abs distance to the exact trajectory (see
      docs/accuracy.md; meaningless on chaotic cells). When the polish was applied
      the returned states are that corrected trajectory, whose own error is then
      typically far below the estimate. `inf` if the correction is not finite,
      `None` with `polish=False`.
    - `sequential_steps`: in the bounded mode, how many time steps were finished by
      the exact sequential pass (`0` if the parallel iterations converged, `T` if
      none were run); `None` otherwise.
    """

    states: PyTree
    num_steps: Int[Array, ""]
    converged: Bool[Array, ""]
    residual: Float[Array, ""]
    trace: Float[Array, " max_steps"] | None
    result: RESULTS
    error_estimate: Float[Array, ""] | None = None
    sequential_steps: Int[Array, ""] | None = None
