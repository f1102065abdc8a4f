"""The largest Lyapunov exponent of a trajectory: a predictor of parallel solve cost.

Gonzalez et al. (NeurIPS 2025) show that the conditioning of the residual
`r_t = s_t - f(x_t, s_{t-1})` is governed by how fast perturbations grow along
the trajectory, i.e. by the largest Lyapunov exponent (LLE) `λ`. With `λ < 0`
the Polyak–Łojasiewicz constant of `½‖r‖²` is bounded away from zero uniformly
in `T` and (quasi-)Newton converges in a number of iterations that hardly grows
with `T`; with `λ > 0` it decays like `e^{-2λT}` and the iteration count grows
with `T`, up to the `T`-step worst case.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from ._shard import shift_right
from ._validate import check_inputs, check_state


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(n, int) for n in x)


@eqx.filter_jit
def lyapunov_exponent(
    cell: Callable,
    inputs: PyTree,
    states: PyTree,
    init_state: PyTree,
    *,
    key: PRNGKeyArray | None = None,
) -> Float[Array, ""]:
    """Estimate the largest Lyapunov exponent (LLE) of a trajectory of `cell`.

    The estimate is the finite-time growth rate of a tangent vector pushed
    through the Jacobians `J_t = ∂cell/∂s (x_t, s_{t-1})` along the given
    trajectory, renormalised at every step so it never overflows:

        w_t = J_t v_{t-1},   λ̂ = (1/T) Σ_t log‖w_t‖,   v_t = w_t / ‖w_t‖,

    starting from a random unit vector `v_0`. After a transient of a few steps,
    `v_t` aligns with the most expanding direction, so `λ̂ → λ` at rate `O(1/T)`.

    **What it predicts** (Gonzalez et al., 2025):

    - `λ̂ < 0` (the trajectory is *predictable*: perturbations die out): the
      solve is well-conditioned at every length, and DEER / quasi-DEER need a
      number of iterations that stays roughly flat as `T` grows.
    - `λ̂ > 0` (chaotic: perturbations grow like `e^{λ̂ t}`): the conditioning
      degrades exponentially in `T`, the iteration count grows with `T`, and
      parallel evaluation loses to a sequential scan for long sequences (every
      solver still stops within `T` iterations).

    Each step is one JVP of the cell, so no `D×D` matrix is formed: the cost is
    that of one sequential evaluation (`O(T)` depth, `O(D)` memory besides the
    trajectory). The recurrence `v_t ∝ J_t v_{t-1}` is linear and could be run
    as an associative scan, but only by materialising the `T` Jacobians
    (`O(T D²)` memory) and their products, which over- or underflow for long
    `T` exactly when `λ ≠ 0`; for a diagnostic the sequential scan is the right
    trade.

    **Arguments:**

    - `cell`: the cell, `cell(input_t, state) -> new_state`.
    - `inputs`: pytree whose leaves share the leading time axis `T`.
    - `states`: the trajectory `s_1..s_T` (pytree like `init_state`, leaves with
      leading axis `T`), e.g. `solve_parallel(...).states` or
      `solve_sequential(...)`. For a time-homogeneous estimate pass a long one.
    - `init_state`: `s_0`, a pytree of floating arrays.
    - `key`: PRNG key for the random initial direction `v_0`; defaults to
      `jax.random.key(0)`. Averaging over a few keys reduces the transient bias.

    **Returns:** a scalar in the state dtype, in nats per step (divide by a time
    step `dt` for a continuous-time exponent). A step whose tangent vanishes
    exactly (a zero Jacobian) contributes `log(tiny)` instead of `-inf`.

    ??? cite "Reference"
        Gonzalez, Kozachkov, Zoltowski, Clarkson, Linderman. *Predictability
        enables parallelization of nonlinear state space models.* NeurIPS 2025.
    """
    T = check_inputs(inputs)
    spec = check_state(init_state)
    want = jax.tree_util.tree_map(lambda x: (T, *jnp.shape(x)), init_state)
    got = jax.tree_util.tree_map(jnp.shape, states)
    if jax.tree_util.tree_structure(states) != jax.tree_util.tree_structure(
        init_state
    ) or jax.tree_util.tree_leaves(got, is_leaf=_is_shape) != jax.tree_util.tree_leaves(
        want, is_leaf=_is_shape
    ):
        raise ValueError(
            "`states` must be a trajectory like `init_state` with the leading time axis "
            f"T={T} of `inputs` on every leaf; expected shapes {want}, got {got}"
        )
    s0 = spec.ravel(init_state)
    traj = spec.ravel_trajectory(states)
    prev = shift_right(traj, s0)
    if key is None:
        key = jax.random.key(0)
    v0 = jax.random.normal(key, s0.shape, spec.dtype)
    v0 = v0 / jnp.linalg.norm(v0)
    tiny = jnp.finfo(spec.dtype).tiny

    def flat(x_t, s):
        return spec.ravel(cell(x_t, spec.unravel(s)))

    def step(v, xs):
        x_t, s = xs
        _, w = jax.jvp(lambda s_: flat(x_t, s_), (s,), (v,))
        norm = jnp.linalg.norm(w)
        ok = norm > tiny
        # A vanishing tangent means J_t v = 0: keep the old direction, so one
        # zero Jacobian does not poison the rest with 0/0.
        v = jnp.where(ok, w / jnp.where(ok, norm, 1), v)
        return v, jnp.log(jnp.maximum(norm, tiny))

    _, logs = jax.lax.scan(step, v0, (inputs, prev))
    return jnp.mean(logs)
