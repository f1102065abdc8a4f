"""ELK and quasi-ELK: Levenberg–Marquardt steps, each one a Kalman smoother.

At the iterate `s` with residual `r_t = s_t - f(x_t, s_{t-1})` and (approximate)
Jacobians `A_t`, the LM correction `δ = s_new - s` minimises

    M(δ) = ½ Σ_t ‖δ_t - A_t δ_{t-1} + r_t‖²  +  (λ/2) Σ_t ‖δ_t‖²,    δ_0 = 0,

i.e. solves `(JᵀJ + λI) δ = -Jᵀ r`. That is the MAP of a linear-Gaussian
state-space model with dynamics `δ_t ~ N(A_t δ_{t-1} - r_t, I)` and observations
`0 ~ N(δ_t, I/λ)`, so it is the Kalman smoother's mean (`_kalman.py`). `λ → 0`
gives the DEER (Newton) step; larger `λ` shrinks the step towards `0` and damps the
unstable directions of the linearised recurrence.

The step is taken on the *unsolved* part only: at the frontier `f` (first step
out of tolerance) `δ_t = 0` for `t < f` and `δ_f = -r_f` (the exact sequential
step) are imposed as exact observations (`λ_t = inf`), and the LM problem is
solved for `t > f`. Without this the smoother moves already-solved states to
lower later residuals; the safeguard then undoes that and the step is wasted
(measured: ELK on Lorenz96 needed ~T iterations without it).
"""

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from .._kalman import kalman_filter, kalman_smoother
from .._problem import Problem
from .._scan import Method, resolve_method
from .._shard import (
    before_first,
    global_length,
    sharded_over,
    shift_right,
    time_index,
    time_sum,
    update_at_time,
)
from .base import AbstractSolver, Iterate, max_residual, safeguard


# λ is kept in this range: above it the step is negligible anyway (the safeguard
# still advances one time step per iteration), below it the step is DEER's to
# working precision; ν is capped so that repeated rejections cannot overflow.
_LAMBDA_MIN, _LAMBDA_MAX, _NU_MAX = 1e-9, 1e9, 2.0**20
# The residual rule's range. Its upper end is low on purpose: in the filter form
# λ caps how far an unstable linearisation may amplify the step (by about
# 1/sqrt(λ)), and λ = 0.1 (about 3x) is already strong damping; letting λ grow
# further turned every iteration into the minimal one-step advance (measured: ~T
# iterations on the unstable GRU and Lorenz96 cases of experiments/convergence.py).
_RESIDUAL_LAMBDA_MIN, _RESIDUAL_LAMBDA_MAX = 1e-9, 1e-1


class _DampingState(eqx.Module):
    lam: Float[Array, ""]  # current damping λ
    nu: Float[Array, ""]  # growth factor of λ on the next rejection (Nielsen)


def _shifted_product(jac, d):
    """`(A_t d_{t-1})_t` with `d_0 = 0`, for dense `(T, D, D)` or diagonal `(T, D)` `A`."""
    prev = shift_right(d, jnp.zeros_like(d[0]))
    if jac.ndim == 3:
        return jnp.einsum("tij,tj->ti", jac, prev, precision=lax.Precision.HIGHEST)
    return jac * prev


def _half_sq_difference(a, b):
    """`½‖a‖² - ½‖b‖²`, computed as `½ Σ (a - b)(a + b)` to avoid cancellation."""
    return time_sum(0.5 * jnp.sum((a - b) * (a + b)))


class _AbstractELK(AbstractSolver):
    """Shared step of `ELK` and `QuasiELK`; they differ in the Jacobian structure."""

    damping: eqx.AbstractVar[float]
    adaptive: eqx.AbstractVar[bool | Literal["residual", "gain_ratio"]]
    posterior: eqx.AbstractVar[Literal["smoother", "filter"]]
    scan: eqx.AbstractVar[Method]

    def __check_init__(self):
        damping = self.damping
        if isinstance(damping, (int, float)) and not (0 <= damping < float("inf")):
            raise ValueError(f"`damping` must be a finite number >= 0, got {damping!r}")
        if self.adaptive not in (False, True, "residual", "gain_ratio"):
            raise ValueError(
                "`adaptive` must be 'residual', 'gain_ratio', True (= 'gain_ratio') or False, "
                f"got {self.adaptive!r}"
            )
        if self.posterior not in ("smoother", "filter"):
            raise ValueError(f"`posterior` must be 'smoother' or 'filter', got {self.posterior!r}")
        resolve_method(self.scan)  # raises on an unknown method

    def linearise(self, problem: Problem, states):
        if self.jacobian == "dense":
            return problem.linearise_dense(states)
        return problem.linearise_diagonal(states)

    def init(self, problem: Problem, states):
        fs, jac = self.linearise(problem, states)
        dtype = states.dtype
        state = _DampingState(jnp.asarray(self.damping, dtype), jnp.asarray(2, dtype))
        return Iterate(states, fs, jac), state

    def _relinearise_one(self, problem, iterate, states, idx):
        """`iterate.fs`/`jac` updated at time `idx` only, for `states` that differ
        from `iterate.states` at `idx - 1` only: one cell evaluation, not `T`."""
        # `idx` is a global time index; sequence-sharded, only its shard updates.
        L = states.shape[0]
        local = jnp.clip(idx - time_index(L)[0], 0, L - 1)
        x = jax.tree_util.tree_map(lambda a: lax.dynamic_slice_in_dim(a, local, 1), problem.inputs)
        first = before_first(states, problem.init)
        prev = jnp.where(local == 0, first, states[jnp.maximum(local - 1, 0)])
        with sharded_over(None):  # one step, on this shard
            f1, j1 = self.linearise(Problem(problem.fn, x, prev), states[:1])
        fs = update_at_time(iterate.fs, idx, f1[0])
        jac = update_at_time(iterate.jac, idx, j1[0])
        return fs, jac

    def step(
        self, problem: Problem, iterate: Iterate, state: _DampingState, frontier: Int[Array, ""]
    ):
        s, jac = iterate.states, iterate.jac
        T = s.shape[0]
        r = s - iterate.fs
        t = time_index(T)  # global time when sequence-sharded
        # The LM step on the unsolved part only. Steps before the frontier are
        # exact and the frontier step is made exact (`δ_f = -r_f`): both are pinned
        # by an exact observation (λ_t = inf), so the smoother cannot move solved
        # states to lower later residuals (which the safeguard would undo).
        lam_t = jnp.where(t <= frontier, jnp.inf, state.lam).astype(s.dtype)
        y = jnp.where((t == frontier)[:, None], -r, 0)
        posterior = kalman_smoother if self.posterior == "smoother" else kalman_filter
        delta, _ = posterior(jac, -r, lam_t, y, method=self.scan)
        proposal = safeguard(s + delta, iterate, frontier)
        fs_new, jac_new = self.linearise(problem, proposal)
        if not self.adaptive:
            return Iterate(proposal, fs_new, jac_new), state
        if self.adaptive == "residual":
            # Always accept (the safeguard has already made the step safe and one
            # step longer); halve λ when the max-norm residual did not grow, double
            # it when it did. Rejecting steps or the global ½‖r‖² merit wasted
            # iterations: far from the frontier the residual of a useful step can
            # still grow for a while.
            improved = max_residual(proposal, fs_new) <= iterate.current_residual()
            lam = jnp.where(improved, state.lam / 2, state.lam * 2)
            lam = jnp.clip(lam, _RESIDUAL_LAMBDA_MIN, _RESIDUAL_LAMBDA_MAX)
            return Iterate(proposal, fs_new, jac_new), _DampingState(lam.astype(s.dtype), state.nu)

        # The minimal safe step (λ = inf: only the frontier made exact) is both the
        # base point of the gain ratio and the fallback on rejection, so a rejected
        # step still advances the solved prefix. Only f at `frontier + 1` differs
        # from the current iterate's: one cell evaluation.
        minimal = safeguard(s, iterate, frontier)
        idx = jnp.minimum(frontier + 1, global_length(T) - 1)
        fs_min, jac_min = self._relinearise_one(problem, iterate, minimal, idx)

        # Gain ratio: actual decrease of L = ½‖r‖² from the minimal step to the
        # proposal, over the decrease the linearised model predicts (≥ 0 for the
        # smoother, whose step minimises the model plus the damping).
        def model(x):
            d = x - s
            return d - _shifted_product(jac, d) + r

        actual = _half_sq_difference(minimal - fs_min, proposal - fs_new)
        predicted = _half_sq_difference(model(minimal), model(proposal))
        ok = jnp.isfinite(actual) & (predicted > 0)
        rho = jnp.where(ok, actual / jnp.where(ok, predicted, 1), -1)
        accept = rho > 0

        lam_accept = state.lam * jnp.maximum(1 / 3, 1 - (2 * rho - 1) ** 3)
        lam = jnp.where(accept, lam_accept, state.lam * state.nu)
        lam = jnp.clip(lam, _LAMBDA_MIN, _LAMBDA_MAX).astype(state.lam.dtype)
        nu = jnp.where(accept, 2, jnp.minimum(2 * state.nu, _NU_MAX)).astype(state.nu.dtype)

        pick = lambda a, b: jnp.where(accept, a, b)
        new = Iterate(pick(proposal, minimal), pick(fs_new, fs_min), pick(jac_new, jac_min))
        return new, _DampingState(lam, nu)


_ARGS_DOC = """
    **Arguments:**

    - `damping`: the LM damping `λ >= 0` to start from, default `1e-3` (with
      `adaptive=False`, the fixed one; `0` is then the undamped DEER step). It is
      the observation precision of the Kalman model, `λ = 1/σ²` in the published
      code's `sigmasq`. In the filter form it caps how much an unstable
      linearisation may amplify the step: by about `1/sqrt(λ)`.
    - `adaptive`: how `λ` changes between iterations.
        - `"residual"` (default): every step is taken; `λ` is halved when the
          max-norm residual did not grow and doubled when it did, within
          `[1e-9, 0.1]`. No tuning: on trained and chaotic models it needed no
          more iterations than the best fixed `λ` of a sweep (see
          `docs/how-to-choose.md`), whose best value moves over six decades from
          model to model.
        - `"gain_ratio"` (or `True`): the textbook LM trust region (Nielsen) on
          `L = ½‖r‖²`: with `ρ` the actual over the predicted decrease of `L`,
          accept if `ρ > 0` and set `λ ← λ·max(1/3, 1 - (2ρ-1)³)`, `ν ← 2`;
          otherwise reject and set `λ ← λν`, `ν ← 2ν`; `λ` in `[1e-9, 1e9]`. Meant
          for `posterior="smoother"`; it needed ~T iterations on unstable cells.
        - `False`: `λ = damping` throughout.
    - `posterior`: `"filter"` (default) takes the filtered mean, as the published
      ELK code does; `"smoother"` takes the smoothed mean, the exact LM step (use
      it with `adaptive=True` for a textbook trust-region LM). The filter has the
      same fixed point but is not the LM minimiser, so the gain ratio is then
      only a heuristic. Being causal, the filter never trades residuals near the
      frontier for residuals later on, which is why it is the default.
    - `scan`: `"auto"` (sequential on CPU, associative elsewhere), `"associative"`
      or `"sequential"`: how the Kalman recursions are evaluated. The gradient's
      adjoint recurrence uses it too.

    **T-step bound.** The LM problem is solved on the unsolved steps only: steps
    before the frontier (the first step not within tolerance) are held fixed and
    the frontier step is set to `f` of its exact predecessor, and the proposal
    also goes through `safeguard` (which enforces this in floating point and
    reverts non-finite or exploding steps). So each *accepted* step extends the
    exact prefix by at least one step. A *rejected* step does not return the old
    iterate (that would stall): it returns the minimal safe step, the old states
    with the frontier step made exact (the `λ → ∞` limit of the step),
    re-linearised at the one time step that changes. The gain ratio is measured
    from that minimal step. Either way the exact prefix grows every iteration, so
    `T` iterations always suffice, and states are always finite.

    ??? cite "References"
        Gonzalez, Warrington, Smith, Linderman. *Towards scalable and stable
        parallelization of nonlinear RNNs.* NeurIPS 2024.

        Nielsen. *Damping parameter in Marquardt's method.* IMM-REP-1999-05, 1999.
"""


class ELK(_AbstractELK):
    __doc__ = (
        """Levenberg–Marquardt with the full Jacobian: each step is a dense Kalman filter.

    Damping turns DEER's Newton step into a trust-region step, meant for unstable
    or chaotic cells where DEER's linearised recurrence explodes. The step is the
    filtered mean of a Kalman model by default (`posterior="filter"`, as in the
    published ELK code); `posterior="smoother"` gives the smoothed mean, the exact
    LM step. `O(T D²)` memory
    like `DEER`, but `O(T D³)` work per iteration even on CPU, where DEER's is
    `O(T D²)`: each time step propagates a `D×D` covariance (two `D×D` products and
    one `D×D` solve, about `8 D³` flops). Measured on a 2-core CPU, per time step
    and iteration: 4 µs at `D = 16`, 0.06 ms at `D = 64`, 0.3 ms at `D = 128` (8–19×
    DEER's); for large `D` on a CPU prefer `QuasiELK` or `DEER`
    (`docs/performance.md`).
"""
        + _ARGS_DOC
    )

    damping: float = 1e-3
    adaptive: bool | Literal["residual", "gain_ratio"] = "residual"
    posterior: Literal["smoother", "filter"] = "filter"
    scan: Method = "auto"
    jacobian = "dense"


class QuasiELK(_AbstractELK):
    __doc__ = (
        """Levenberg–Marquardt on the diagonal of the Jacobian: `D` scalar Kalman filters.

    The damped counterpart of `QuasiDEER`: `O(T D)` work and memory per
    iteration, using the cell's analytic `diagonal_jacobian` when it has one.
"""
        + _ARGS_DOC
    )

    damping: float = 1e-3
    adaptive: bool | Literal["residual", "gain_ratio"] = "residual"
    posterior: Literal["smoother", "filter"] = "filter"
    scan: Method = "auto"
    jacobian = "diagonal"
