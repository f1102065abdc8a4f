"""An implicit state-space cell (after Schöne et al., ICML 2025), kept small.

Per token, a hidden `z ∈ R^K` is the fixed point of

    h(z)  = Λ(z, x) ⊙ s + (1 - Λ(z, x)) ⊙ tanh(W_uz z + W_ux x + b_u)      (state candidate)
    Λ(z, x) = exp(-a ⊙ softplus(W_λz z + W_λx x + b_λ)),   a = exp(log_a) > 0   (Mamba-like decay)
    z     = φ(z, h(z), x) = tanh(c (W_zz z + W_zh h(z)) + W_zx x + b_z)

and the new state is `s' = h(z*)`. Given `z`, the state update is a diagonal
linear recurrence (the SSM); the fixed point makes it nonlinear in `s`.

Contraction by construction. Since `Λ ∈ (0, 1)`, `h` is a convex combination of
`s` and a point of `(-1, 1)^D`, so `[-1, 1]^D` is invariant. There,
`|∂Λ/∂q| ≤ a`, so `‖∂h/∂z‖₂ ≤ 2 max(a) ‖W_λz‖₂ + ‖W_uz‖₂` and the inner map
`z ↦ φ(z, h(z), x)` is Lipschitz with constant at most
`c (‖W_zz‖₂ + ‖W_zh‖₂ (2 max(a) ‖W_λz‖₂ + ‖W_uz‖₂))`. The scale `c ≤ 1` is chosen
at every call (from the current weights, so it survives training) to make that
bound `contraction < 1`: the inner fixed-point iteration converges linearly for
every state in `[-1, 1]^D`. Outside that box (e.g. a wild outer iterate) the bound
can fail; the iteration count is capped and `inner_solve` reports it. The cell
itself then returns NaN: its value is undefined, and a finite stand-in (the last
inner iterate) would let an outer solver certify a trajectory of a different
model. `solve_parallel` reports that as `RESULTS.nonfinite` with finite states.

Derivatives (forward and reverse) go through the fixed point by the implicit
function theorem (optimistix's `ImplicitAdjoint`), not through the iterations.
The Jacobian in `s`, with `H_z = ∂h/∂z`, `G_z = ∂φ/∂z`, `G_h = ∂φ/∂h`, is

    ∂s'/∂s = diag(Λ) + H_z (I - G_z - G_h H_z)⁻¹ G_h diag(Λ),

dense although `Λ` is diagonal; `diagonal_jacobian` returns its exact diagonal at
`O(K³ + K² D)` cost.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, Bool, Float, PRNGKeyArray, Scalar

from .._misc import default_dtype


def _max_norm(tree) -> Scalar:
    # optimistix's FixedPointIteration starts its error at `jnp.array(inf)`, the
    # default float dtype (float64 under x64); returning the norm in that same dtype
    # keeps its while loop type-stable for float32 states under x64.
    return optx.max_norm(tree).astype(jnp.asarray(jnp.inf).dtype)


def _nan_unless(ok: Bool[Array, ""], h: Float[Array, " D"]) -> Float[Array, " D"]:
    return jnp.where(ok, h, jnp.nan)


class _Gates(eqx.Module):
    """Everything computed at a given `z`, shared by the value and the diagonal."""

    decay: Array  # Λ, (D,)
    decay_dq: Array  # ∂Λ/∂q, (D,)
    target: Array  # tanh(W_uz z + W_ux x + b_u), (D,)
    h: Array  # (D,)


class ImplicitSSM(eqx.Module):
    """A minimal implicit SSM cell `s' = h(z*)`, `z* = φ(z*, h(z*), x)` (see the module docstring).

    **Arguments:**

    - `input_size`, `state_size`, `hidden_size`: `M`, the state size `D` and the
      size `K` of the implicit hidden `z`.
    - `contraction`: bound `< 1` on the Lipschitz constant of the inner map (for
      states in `[-1, 1]^D`); smaller is faster to solve and less nonlinear.
    - `damping`: `z ← damping·z + (1 - damping)·φ(z)`; `0` (no damping) suffices
      because the map is contractive, larger values trade speed for robustness.
    - `max_steps`: cap on the inner iterations.
    - `rtol`, `atol`: inner tolerance on `|z_{n+1} - z_n|`; `None` means
      `1e-12` (float64) or `1e-6` (float32), well below the outer solvers' defaults.
    - `dtype`: float64 under x64, else float32 by default.
    - `key`: PRNG key (keyword only).

    ??? cite "Reference"
        Schöne, Rahmani, Kremer, Falck, Ballani, Gladrow. *Implicit language models
        are RNNs: balancing parallelization and expressivity.* ICML 2025.
    """

    w_zz: Float[Array, "K K"]
    w_zh: Float[Array, "K D"]
    w_zx: Float[Array, "K M"]
    b_z: Float[Array, " K"]
    w_lz: Float[Array, "D K"]
    w_lx: Float[Array, "D M"]
    b_l: Float[Array, " D"]
    log_a: Float[Array, " D"]
    w_uz: Float[Array, "D K"]
    w_ux: Float[Array, "D M"]
    b_u: Float[Array, " D"]
    contraction: float = eqx.field(static=True)
    damping: float = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    rtol: float | None = eqx.field(static=True)
    atol: float | None = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        state_size: int,
        hidden_size: int,
        contraction: float = 0.5,
        damping: float = 0.0,
        max_steps: int = 100,
        rtol: float | None = None,
        atol: float | None = None,
        dtype=None,
        *,
        key: PRNGKeyArray,
    ):
        if not 0 < contraction < 1:
            raise ValueError(f"`contraction` must lie in (0, 1); got {contraction}")
        if not 0 <= damping < 1:
            raise ValueError(f"`damping` must lie in [0, 1); got {damping}")
        if max_steps < 1:
            raise ValueError(f"`max_steps` must be >= 1; got {max_steps}")
        dtype = default_dtype(dtype)
        M, D, K = input_size, state_size, hidden_size
        keys = iter(jax.random.split(key, 10))

        def normal(shape, fan_in):
            return jax.random.normal(next(keys), shape, dtype) / math.sqrt(max(fan_in, 1))

        def spectral(shape, norm):
            # Random direction, given spectral norm: sets how the Lipschitz budget
            # is shared at init. Most goes to the state -> z coupling W_zh (the
            # implicit part); with these norms the bound is 0.8, so c = 5/8 for the
            # default contraction 0.5.
            w = jax.random.normal(next(keys), shape, dtype)
            return norm * w / jnp.linalg.norm(w, ord=2)

        self.w_zz, self.w_zh = spectral((K, K), 0.1), spectral((K, D), 1.0)
        self.w_zx, self.b_z = normal((K, M), M), 0.1 * normal((K,), 1)
        self.w_lz, self.w_lx = spectral((D, K), 0.2), normal((D, M), M)
        # A spread of time scales, as in Mamba's Δ initialisation: Λ from ~0.98 to ~0.3.
        self.b_l = jnp.linspace(-4.0, 1.0, D, dtype=dtype)
        self.log_a = jnp.zeros((D,), dtype)
        self.w_uz, self.w_ux = spectral((D, K), 0.3), normal((D, M), M)
        self.b_u = 0.1 * normal((D,), 1)
        self.contraction = contraction
        self.damping = damping
        self.max_steps = max_steps
        self.rtol = rtol
        self.atol = atol

    def _scale(self) -> Scalar:
        """`c`: makes the inner map's Lipschitz bound at most `contraction` (module docstring)."""
        norm = lambda w: jnp.linalg.norm(w, ord=2)
        a_max = jnp.max(jnp.exp(self.log_a))
        bound = norm(self.w_zz) + norm(self.w_zh) * (2 * a_max * norm(self.w_lz) + norm(self.w_uz))
        return jnp.minimum(1.0, self.contraction / bound)

    def _gates(self, z, s, x) -> _Gates:
        q = self.w_lz @ z + self.w_lx @ x + self.b_l
        a = jnp.exp(self.log_a)
        decay = jnp.exp(-a * jax.nn.softplus(q))
        decay_dq = -a * jax.nn.sigmoid(q) * decay
        target = jnp.tanh(self.w_uz @ z + self.w_ux @ x + self.b_u)
        return _Gates(decay, decay_dq, target, decay * s + (1 - decay) * target)

    def _phi(self, z, h, x, c):
        return jnp.tanh(c * (self.w_zz @ z + self.w_zh @ h) + self.w_zx @ x + self.b_z)

    def _tolerances(self, dtype) -> tuple[float, float]:
        default = 1e-12 if jnp.finfo(dtype).eps < 1e-12 else 1e-6
        rtol = default if self.rtol is None else self.rtol
        atol = default if self.atol is None else self.atol
        return rtol, atol

    def inner_solve(
        self, input_t: Float[Array, " M"], state: Float[Array, " D"]
    ) -> tuple[Float[Array, " K"], Bool[Array, ""]]:
        """The hidden fixed point `z*` for this token and state, and whether the inner
        iteration met its tolerance within `max_steps` (if not, `z` is the last iterate)."""

        def fn(z, args):
            cell, s, x, c = args
            return cell._phi(z, cell._gates(z, s, x).h, x, c)

        rtol, atol = self._tolerances(state.dtype)
        z0 = jnp.zeros(self.w_zz.shape[0], state.dtype)
        sol = optx.fixed_point(
            fn,
            optx.FixedPointIteration(rtol=rtol, atol=atol, norm=_max_norm, damp=self.damping),
            z0,
            (self, state, input_t, self._scale()),
            max_steps=self.max_steps,
            throw=False,
            adjoint=optx.ImplicitAdjoint(),
        )
        return sol.value, sol.result == optx.RESULTS.successful

    def __call__(
        self, input_t: Float[Array, " M"], state: Float[Array, " D"]
    ) -> Float[Array, " D"]:
        z, ok = self.inner_solve(input_t, state)
        return _nan_unless(ok, self._gates(z, state, input_t).h)

    def value_and_diagonal_jacobian(
        self, input_t: Float[Array, " M"], state: Float[Array, " D"]
    ) -> tuple[Float[Array, " D"], Float[Array, " D"]]:
        """`(s', diag ∂s'/∂s)` from one inner solve, the diagonal by the IFT formula."""
        z, ok = self.inner_solve(input_t, state)
        g = self._gates(z, state, input_t)
        c = self._scale()
        phi = self._phi(z, g.h, input_t, c)
        dphi = (1 - phi**2)[:, None] * c
        G_z = dphi * self.w_zz
        G_h = dphi * self.w_zh
        H_z = (g.decay_dq * (state - g.target))[:, None] * self.w_lz + (
            (1 - g.decay) * (1 - g.target**2)
        )[:, None] * self.w_uz
        K = z.shape[0]
        system = jnp.eye(K, dtype=z.dtype) - G_z - G_h @ H_z
        X = jnp.linalg.solve(system, G_h * g.decay[None, :])  # (K, D)
        return _nan_unless(ok, g.h), g.decay + jnp.einsum("ik,ki->i", H_z, X)

    def diagonal_jacobian(
        self, input_t: Float[Array, " M"], state: Float[Array, " D"]
    ) -> Float[Array, " D"]:
        """Exact diagonal of the dense `∂s'/∂s` (implicit function theorem; module docstring)."""
        return self.value_and_diagonal_jacobian(input_t, state)[1]
