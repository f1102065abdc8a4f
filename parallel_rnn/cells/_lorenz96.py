"""The Lorenz-96 system, one RK4 step per transition: a chaotic test cell.

    dx_i/dt = (x_{i+1} - x_{i-2}) x_{i-1} - x_i + F + u_i,   indices cyclic.

The Jacobian of the vector field is a cyclic banded matrix (offsets -2..+1), and
so is every product and sum of such matrices: the RK4 step's Jacobian is
`I + dt/6 (K1 + 2 K2 + 2 K3 + K4)` with `K1 = J(x)`, `K2 = J(y2)(I + dt/2 K1)`,
`K3 = J(y3)(I + dt/2 K2)`, `K4 = J(y4)(I + dt K3)` (chain rule through the stages
`y2 = x + dt/2 k1`, ...). We carry these matrices as a few diagonals ("bands"),
so the exact Jacobian diagonal costs `O(D)`, never a `D×D` matrix.
"""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float


# A cyclic banded matrix: {offset k (mod D): d_k} with M[i, (i + k) mod D] = d_k[i].
_Bands = dict[int, Array]


def _add(a: _Bands, b: _Bands, scale: float = 1.0) -> _Bands:
    out = dict(a)
    for k, v in b.items():
        out[k] = out[k] + scale * v if k in out else scale * v
    return out


def _matmul(a: _Bands, b: _Bands, dim: int, only: int | None = None) -> _Bands:
    # (AB)[i, i+p+q] = Σ A[i, i+p] B[i+p, i+p+q] = Σ a_p[i] b_q[i+p].
    # Offsets are reduced mod D, so small D (where bands wrap and overlap) is exact too.
    out: _Bands = {}
    for p, ap in a.items():
        for q, bq in b.items():
            k = (p + q) % dim
            if only is not None and k != only:
                continue
            term = ap * jnp.roll(bq, -p)
            out[k] = out[k] + term if k in out else term
    return out


def _identity(x: Array) -> _Bands:
    return {0: jnp.ones_like(x)}


class Lorenz96(eqx.Module):
    """One step `x ↦ RK4_dt(x)` of the forced Lorenz-96 system (chaotic for `F = 8`).

    Called as `cell(u_t, x)`: `u_t` (shape `(dim,)`) is added to the forcing `F`
    (pass zeros for the autonomous system). RK4 is used rather than Euler because it
    is closer to the one adaptive Dopri5 step per transition of the ELK paper's
    experiment, and because Euler's Jacobian diagonal is the constant `1 - dt`,
    which would make the quasi solvers look better than they are.

    **Arguments:**

    - `dim`: number of variables `D` (any `D >= 1`; the chaotic regime needs `D >= 4`).
    - `forcing`: the constant forcing `F`.
    - `dt`: the time step.

    ??? cite "Reference"
        Lorenz, *Predictability: a problem partly solved*, ECMWF 1996.
    """

    dim: int = eqx.field(static=True)
    forcing: float = 8.0
    dt: float = 0.01

    def __init__(self, dim: int = 5, forcing: float = 8.0, dt: float = 0.01):
        if dim < 1:
            raise ValueError(f"Lorenz96 needs dim >= 1; got dim={dim}")
        self.dim = dim
        self.forcing = forcing
        self.dt = dt

    def vector_field(self, u: Float[Array, " D"], x: Float[Array, " D"]) -> Float[Array, " D"]:
        """`dx/dt` at `x` with input `u`."""
        x_next, x_prev, x_prev2 = jnp.roll(x, -1), jnp.roll(x, 1), jnp.roll(x, 2)
        return (x_next - x_prev2) * x_prev - x + self.forcing + u

    def _field_jacobian(self, x: Array) -> _Bands:
        # ∂f_i/∂x_{i+1} = x_{i-1}, ∂f_i/∂x_{i-1} = x_{i+1} - x_{i-2},
        # ∂f_i/∂x_{i-2} = -x_{i-1}, ∂f_i/∂x_i = -1 (summed where offsets coincide mod D).
        x_next, x_prev, x_prev2 = jnp.roll(x, -1), jnp.roll(x, 1), jnp.roll(x, 2)
        bands = [(0, -jnp.ones_like(x)), (1, x_prev), (-1, x_next - x_prev2), (-2, -x_prev)]
        out: _Bands = {}
        for k, v in bands:
            out = _add(out, {k % self.dim: v})
        return out

    def _stages(self, u, x):
        dt = self.dt
        k1 = self.vector_field(u, x)
        y2 = x + 0.5 * dt * k1
        k2 = self.vector_field(u, y2)
        y3 = x + 0.5 * dt * k2
        k3 = self.vector_field(u, y3)
        y4 = x + dt * k3
        k4 = self.vector_field(u, y4)
        return (k1, k2, k3, k4), (y2, y3, y4)

    def __call__(self, u_t: Float[Array, " D"], x: Float[Array, " D"]) -> Float[Array, " D"]:
        (k1, k2, k3, k4), _ = self._stages(u_t, x)
        return x + (self.dt / 6) * (k1 + 2 * k2 + 2 * k3 + k4)

    def value_and_diagonal_jacobian(
        self, u_t: Float[Array, " D"], x: Float[Array, " D"]
    ) -> tuple[Float[Array, " D"], Float[Array, " D"]]:
        """The step and the diagonal of its Jacobian `∂x'/∂x`, sharing the RK4 stages."""
        dt, D = self.dt, self.dim
        (k1, k2, k3, k4), (y2, y3, y4) = self._stages(u_t, x)
        eye = _identity(x)
        K1 = self._field_jacobian(x)
        K2 = _matmul(self._field_jacobian(y2), _add(eye, K1, 0.5 * dt), D)
        K3 = _matmul(self._field_jacobian(y3), _add(eye, K2, 0.5 * dt), D)
        # Only the main diagonal of K4 is needed.
        K4 = _matmul(self._field_jacobian(y4), _add(eye, K3, dt), D, only=0)
        diag = 1 + (dt / 6) * (K1[0] + 2 * K2[0] + 2 * K3[0] + K4[0])
        value = x + (dt / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
        return value, diag

    def diagonal_jacobian(
        self, u_t: Float[Array, " D"], x: Float[Array, " D"]
    ) -> Float[Array, " D"]:
        """Diagonal of `∂x'/∂x`, exact, in `O(D)` (see the module docstring)."""
        return self.value_and_diagonal_jacobian(u_t, x)[1]
