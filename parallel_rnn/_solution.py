"""The result of `solve_parallel`."""

import equinox as eqx
from jaxtyping import Array, Bool, Float, Int, PyTree


class Solution(eqx.Module):
    """What `solve_parallel` returns.

    **Attributes:**

    - `states`: the trajectory `s_1..s_T`, a pytree like `init_state` whose leaves
      have a leading time axis `T`. Always finite.
    - `num_steps`: int32 scalar, iterations used (under `vmap`, one per sequence).
    - `converged`: bool scalar, True only if `|r_t| <= atol + rtol |s_t|` holds
      elementwise for every `t`, where `r_t = s_t - f(s_{t-1}, x_t)`.
    - `residual`: max-norm of `r` at `states` (`inf` if it is not finite).
    - `trace`: with `trace=True`, shape `(max_steps,)`: the max-norm residual after
      each iteration, NaN past the last one; otherwise `None`.
    """

    states: PyTree
    num_steps: Int[Array, ""]
    converged: Bool[Array, ""]
    residual: Float[Array, ""]
    trace: Float[Array, " max_steps"] | None
