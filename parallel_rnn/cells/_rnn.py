"""GRU, LSTM and Elman cells with closed-form Jacobians and Jacobian diagonals.

`GRU` and `LSTM` hold Equinox's own cells and compute exactly their functions;
what they add is `diagonal_jacobian(input_t, state)`, the diagonal of
`∂new_state/∂state` in `O(D)` on top of one step (the gates are shared), where
autodiff needs `D` JVP passes (the formulas are in docs/cells.md), and `value_and_jacobian`,
the full Jacobian written from the gates in one pass over `D×D` (a few scaled
copies of the recurrent weights), where `jax.jacfwd` pushes `D` tangents through
every intermediate of the step, and `value_and_gated_jacobian`, that Jacobian
factored as those scalings (`GatedJacobian`: `O(D)` numbers per step), which `DEER`
stores and applies without ever forming the `D×D` matrices.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._gated import GatedJacobian
from .._misc import default_dtype
from .._structure import register_jacobian


def _block_diagonals(weight: Array, blocks: int) -> list[Array]:
    """Diagonals of the `blocks` stacked square `(D, D)` blocks of a `(blocks·D, D)` matrix."""
    return [jnp.diagonal(w) for w in jnp.split(weight, blocks)]


def _recurrent(weight: Float[Array, "KD D"], h: Float[Array, " D"]) -> Float[Array, " KD"]:
    """`weight @ h`, written as `h @ weightᵀ` from `D = 32` on.

    Batched over time (`vmap`) the second form gives a time-major `(T, K·D)`
    product; `DEER`'s iteration on the GRU and the LSTM then took 10-20% less
    at `D = 64` on XLA:CPU, and 5-13% more at `D = 16` (the same products)."""
    return h @ weight.T if h.shape[-1] >= 32 else weight @ h


def _diag(v: Float[Array, " D"]) -> Float[Array, "D D"]:
    """`jnp.diag(v)` as a product with the identity, which XLA fuses into its consumer."""
    return v[:, None] * jnp.eye(v.shape[0], dtype=v.dtype)


class _EquinoxCellWrapper(eqx.Module):
    """Holds one of Equinox's cells (`cell`) and computes exactly its function."""

    cell: eqx.AbstractVar[eqx.Module]
    _wrapped: eqx.AbstractClassVar[type]

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        use_bias: bool = True,
        dtype=None,
        *,
        key: PRNGKeyArray,
    ):
        self.cell = self._wrapped(input_size, hidden_size, use_bias, dtype, key=key)

    @classmethod
    def wrap(cls, cell):
        """A wrapper computing exactly `cell` (same weights, no copy)."""
        if not isinstance(cell, cls._wrapped):
            raise TypeError(f"{cls.__name__}.wrap expects {cls._wrapped}; got {type(cell)}")
        # Build a throwaway shell of the right sizes, then put `cell` in it.
        shell = cls(
            cell.input_size,
            cell.hidden_size,
            cell.use_bias,
            cell.weight_hh.dtype,
            key=jax.random.key(0),
        )
        return eqx.tree_at(lambda w: w.cell, shell, cell)

    @property
    def hidden_size(self) -> int:
        return self.cell.hidden_size  # pyright: ignore[reportAttributeAccessIssue]

    @property
    def input_size(self) -> int:
        return self.cell.input_size  # pyright: ignore[reportAttributeAccessIssue]


class GRU(_EquinoxCellWrapper):
    """`eqx.nn.GRUCell`, plus its Jacobian diagonal in closed form.

    Called as `cell(input_t, h) -> h'`, with Equinox's gate layout:

        r = σ(W_ir x + b_r + W_hr h),   z = σ(W_iz x + b_z + W_hz h),
        n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn)),   h' = n + z ⊙ (h - n).

    **Arguments:** those of `eqx.nn.GRUCell`: `input_size`, `hidden_size`,
    `use_bias=True`, `dtype=None` (float64 under x64, else float32) and the
    keyword-only `key`. To wrap an existing cell use `GRU.wrap`.
    """

    cell: eqx.nn.GRUCell
    _wrapped = eqx.nn.GRUCell

    def __call__(self, input_t: Float[Array, " M"], h: Float[Array, " D"]) -> Float[Array, " D"]:
        return self.cell(input_t, h)

    def value_and_diagonal_jacobian(
        self, input_t: Float[Array, " M"], h: Float[Array, " D"]
    ) -> tuple[Float[Array, " D"], Float[Array, " D"]]:
        """`(h', diag ∂h'/∂h)` from one evaluation of the gates."""
        return gru_value_and_diagonal(self.cell, input_t, h)

    def value_and_jacobian(
        self, input_t: Float[Array, " M"], h: Float[Array, " D"]
    ) -> tuple[Float[Array, " D"], Float[Array, "D D"]]:
        """`(h', ∂h'/∂h)`, the Jacobian as
        `diag(α) W_hz + diag(β) W_hr + diag(γ) W_hn + diag(z)` with
        `α = (h-n) z(1-z)`, `β = (1-z)(1-n²)(W_hn h + b_hn) r(1-r)`, `γ = (1-z)(1-n²) r`."""
        return gru_value_and_jacobian(self.cell, input_t, h)

    def value_and_gated_jacobian(
        self, input_t: Float[Array, " M"], h: Float[Array, " D"]
    ) -> tuple[Float[Array, " D"], GatedJacobian]:
        """`(h', ∂h'/∂h)`, the Jacobian factored as `GatedJacobian(W_hh, [β, α, γ], z)`."""
        return gru_value_and_gated(self.cell, input_t, h)

    def diagonal_jacobian(
        self, input_t: Float[Array, " M"], h: Float[Array, " D"]
    ) -> Float[Array, " D"]:
        """Diagonal of `∂h'/∂h`: `(1-z) n' + z + (h-n) z'`, with
        `z' = z(1-z) diag(W_hz)`, `r' = r(1-r) diag(W_hr)`,
        `n' = (1-n²)(r' (W_hn h + b_hn) + r diag(W_hn))`."""
        return self.value_and_diagonal_jacobian(input_t, h)[1]


def _gru_coefficients(cell: eqx.nn.GRUCell, input_t, h):
    """`h'` and the vectors of `∂h'/∂h = diag(α) W_hz + diag(β) W_hr + diag(γ) W_hn
    + diag(z)`: `α = (h-n) z(1-z)`, `β = (1-z)(1-n²)(W_hn h + b_hn) r(1-r)`,
    `γ = (1-z)(1-n²) r`, from one evaluation of the gates."""
    bias = cell.bias if cell.use_bias else 0
    bias_n = cell.bias_n if cell.use_bias else 0
    i_r, i_z, i_n = jnp.split(cell.weight_ih @ input_t + bias, 3)
    h_r, h_z, h_n = jnp.split(_recurrent(cell.weight_hh, h), 3)
    r = jax.nn.sigmoid(i_r + h_r)
    z = jax.nn.sigmoid(i_z + h_z)
    c_n = h_n + bias_n  # pyright: ignore[reportOperatorIssue]
    n = jnp.tanh(i_n + r * c_n)
    new = n + z * (h - n)
    dn = (1 - z) * (1 - n**2)
    return new, (h - n) * z * (1 - z), dn * c_n * r * (1 - r), dn * r, z


def gru_value_and_diagonal(cell: eqx.nn.GRUCell, input_t, h):
    """`(h', diag ∂h'/∂h)` of an `eqx.nn.GRUCell`, from one evaluation of the gates."""
    new, alpha, beta, gamma, z = _gru_coefficients(cell, input_t, h)
    w_r, w_z, w_n = _block_diagonals(cell.weight_hh, 3)
    return new, alpha * w_z + beta * w_r + gamma * w_n + z


def gru_value_and_jacobian(cell: eqx.nn.GRUCell, input_t, h):
    """`(h', ∂h'/∂h)` of an `eqx.nn.GRUCell`, the Jacobian written from the gates."""
    new, alpha, beta, gamma, z = _gru_coefficients(cell, input_t, h)
    w_r, w_z, w_n = jnp.split(cell.weight_hh, 3)
    # One elementwise pass writes each D×D matrix (`_diag`, not `jnp.diag`,
    # whose broadcast-and-select is not fused as well under vmap).
    jac = alpha[:, None] * w_z + beta[:, None] * w_r + gamma[:, None] * w_n + _diag(z)
    return new, jac


def gru_value_and_gated(cell: eqx.nn.GRUCell, input_t, h):
    """`(h', ∂h'/∂h)` of an `eqx.nn.GRUCell` in gated form: the coefficients of
    `W_hr, W_hz, W_hn` (the order of `weight_hh`) and the diagonal part `z`."""
    new, alpha, beta, gamma, z = _gru_coefficients(cell, input_t, h)
    coeffs = jnp.stack([beta, alpha, gamma])  # (3, D)
    return new, GatedJacobian(cell.weight_hh, coeffs, z[:, None, None])


class LSTM(_EquinoxCellWrapper):
    """`eqx.nn.LSTMCell`, plus its Jacobian diagonal in closed form.

    Called as `cell(input_t, (h, c)) -> (h', c')`, with Equinox's gate layout
    `[i, f, g, o] = split(W_ih x + W_hh h + b)` through `σ, σ, tanh, σ`, then
    `c' = f ⊙ c + i ⊙ g`, `h' = o ⊙ tanh(c')`.

    `diagonal_jacobian` returns `(diag ∂h'/∂h, diag ∂c'/∂c)`: the diagonal of the
    full `2D × 2D` Jacobian in the state order `(h, c)`. The off-diagonal blocks
    `∂h'/∂c = diag(o (1 - tanh² c') f)` and `∂c'/∂h` are dropped, as quasi-DEER does.

    **Arguments:** as for `eqx.nn.LSTMCell`: `input_size`, `hidden_size`,
    `use_bias=True`, `dtype=None`, keyword-only `key`. To wrap an existing cell use
    `LSTM.wrap`.
    """

    cell: eqx.nn.LSTMCell
    _wrapped = eqx.nn.LSTMCell

    def __call__(
        self, input_t: Float[Array, " M"], state: tuple[Array, Array]
    ) -> tuple[Array, Array]:
        return self.cell(input_t, state)

    def value_and_diagonal_jacobian(
        self, input_t: Float[Array, " M"], state: tuple[Array, Array]
    ) -> tuple[tuple[Array, Array], tuple[Array, Array]]:
        """`((h', c'), (diag ∂h'/∂h, diag ∂c'/∂c))` from one evaluation of the gates."""
        return lstm_value_and_diagonal(self.cell, input_t, state)

    def value_and_block_jacobian(
        self, input_t: Float[Array, " M"], state: tuple[Array, Array]
    ) -> tuple[tuple[Array, Array], Float[Array, "D 2 2"]]:
        """`((h', c'), B)` with `B[j]` the `2×2` Jacobian of `(h'_j, c'_j)` with respect
        to `(h_j, c_j)`: the diagonal blocks used by `BlockQuasiDEER`."""
        return lstm_value_and_blocks(self.cell, input_t, state)

    def value_and_jacobian(
        self, input_t: Float[Array, " M"], state: tuple[Array, Array]
    ) -> tuple[tuple[Array, Array], Float[Array, "2D 2D"]]:
        """`((h', c'), J)` with `J` the `2D × 2D` Jacobian in the state order `(h, c)`:
        `[[∂h'/∂h, ∂h'/∂c], [∂c'/∂h, diag(f)]]`."""
        return lstm_value_and_jacobian(self.cell, input_t, state)

    def value_and_gated_jacobian(
        self, input_t: Float[Array, " M"], state: tuple[Array, Array]
    ) -> tuple[tuple[Array, Array], GatedJacobian]:
        """`((h', c'), J)` with `J` factored as `GatedJacobian`: `W_hh` acting on `h`,
        its four blocks scaled into `∂h'/∂h` and `∂c'/∂h`, and the `2×2` blocks
        `[[0, κ f], [0, f]]` of `∂/∂c` per unit."""
        return lstm_value_and_gated(self.cell, input_t, state)

    def diagonal_jacobian(
        self, input_t: Float[Array, " M"], state: tuple[Array, Array]
    ) -> tuple[Array, Array]:
        """`(diag ∂h'/∂h, diag ∂c'/∂c = f)`, from the gates (formulas: docs/cells.md)."""
        return self.value_and_diagonal_jacobian(input_t, state)[1]


def _lstm_coefficients(cell: eqx.nn.LSTMCell, input_t, state):
    """`(h', c')` and the vectors of the Jacobian blocks, from one evaluation of
    the gates: `∂c'/∂h = diag(a_f) W_f + diag(a_i) W_i + diag(a_g) W_g`,
    `∂h'/∂h = diag(a_o) W_o + diag(κ) ∂c'/∂h`, `∂h'/∂c = diag(κ f)`,
    `∂c'/∂c = diag(f)`, with `κ = o (1 - tanh² c')`."""
    h, c = state
    lin = cell.weight_ih @ input_t + _recurrent(cell.weight_hh, h)
    if cell.use_bias:
        lin = lin + cell.bias
    i, f, g, o = jnp.split(lin, 4)
    i, f, g, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)
    c_new = f * c + i * g
    tanh_c = jnp.tanh(c_new)
    coefficients = dict(
        i=g * i * (1 - i),
        f=c * f * (1 - f),
        g=i * (1 - g**2),
        o=tanh_c * o * (1 - o),
        kappa=o * (1 - tanh_c**2),
        forget=f,
    )
    return (o * tanh_c, c_new), coefficients


def _lstm_diagonals(cell, a):
    """`(diag ∂h'/∂h, diag ∂c'/∂h)` from the coefficients."""
    w_i, w_f, w_g, w_o = _block_diagonals(cell.weight_hh, 4)
    dc_dh = a["f"] * w_f + a["i"] * w_i + a["g"] * w_g
    return a["o"] * w_o + a["kappa"] * dc_dh, dc_dh


def lstm_value_and_diagonal(cell: eqx.nn.LSTMCell, input_t, state):
    """`((h', c'), (diag ∂h'/∂h, diag ∂c'/∂c))` of an `eqx.nn.LSTMCell`."""
    new, a = _lstm_coefficients(cell, input_t, state)
    return new, (_lstm_diagonals(cell, a)[0], a["forget"])


def lstm_value_and_blocks(cell: eqx.nn.LSTMCell, input_t, state):
    """`((h', c'), (D, 2, 2) blocks)` of an `eqx.nn.LSTMCell`: per unit `j` the
    Jacobian of `(h'_j, c'_j)` with respect to `(h_j, c_j)`."""
    new, a = _lstm_coefficients(cell, input_t, state)
    dh_dh, dc_dh = _lstm_diagonals(cell, a)
    top = jnp.stack([dh_dh, a["kappa"] * a["forget"]], axis=-1)
    bottom = jnp.stack([dc_dh, a["forget"]], axis=-1)
    return new, jnp.stack([top, bottom], axis=-2)


def lstm_value_and_jacobian(cell: eqx.nn.LSTMCell, input_t, state):
    """`((h', c'), J)` of an `eqx.nn.LSTMCell`, `J` the `2D × 2D` Jacobian in the
    order `(h, c)`, written from the gates."""
    new, a = _lstm_coefficients(cell, input_t, state)
    w_i, w_f, w_g, w_o = jnp.split(cell.weight_hh, 4)
    col = lambda v: v[:, None]  # noqa: E731
    dc_dh = col(a["f"]) * w_f + col(a["i"]) * w_i + col(a["g"]) * w_g
    dh_dh = col(a["o"]) * w_o + col(a["kappa"]) * dc_dh
    top = jnp.concatenate([dh_dh, _diag(a["kappa"] * a["forget"])], axis=1)
    bottom = jnp.concatenate([dc_dh, _diag(a["forget"])], axis=1)
    return new, jnp.concatenate([top, bottom], axis=0)


def lstm_value_and_gated(cell: eqx.nn.LSTMCell, input_t, state):
    """`((h', c'), J)` of an `eqx.nn.LSTMCell`, `J` in gated form (`m = n`, `p = 2`):
    row `(h'; c')` of `W_k h` scaled by `(κ a_k; a_k)` for `k = i, f, g` and by
    `(a_o; 0)` for `o`, plus the per-unit blocks `[[0, κ f], [0, f]]`."""
    new, a = _lstm_coefficients(cell, input_t, state)
    kappa, forget = a["kappa"], a["forget"]
    zero = jnp.zeros_like(kappa)
    coeffs = jnp.stack(
        [jnp.concatenate([kappa * a[k], a[k]]) for k in ("i", "f", "g")]
        + [jnp.concatenate([a["o"], zero])]
    )  # (4, 2n), in the order of `weight_hh`
    top = jnp.stack([zero, kappa * forget], axis=-1)
    bottom = jnp.stack([zero, forget], axis=-1)
    return new, GatedJacobian(cell.weight_hh, coeffs, jnp.stack([top, bottom], axis=-2))


# Equinox's own cells get the closed forms without wrapping: `solve_parallel`
# looks the cell's class up in this registry first.
register_jacobian(
    eqx.nn.GRUCell,
    value_and_diagonal=gru_value_and_diagonal,
    value_and_jacobian=gru_value_and_jacobian,
    value_and_gated=gru_value_and_gated,
)
register_jacobian(
    eqx.nn.LSTMCell,
    value_and_diagonal=lstm_value_and_diagonal,
    value_and_blocks=lstm_value_and_blocks,
    value_and_jacobian=lstm_value_and_jacobian,
    value_and_gated=lstm_value_and_gated,
)


class Elman(eqx.Module):
    """The tanh ("vanilla", Elman) RNN `s' = tanh(W s + U x + b)`.

    `W ~ N(0, gain²/D)`: with `D` large, `gain < 1` gives a contracting network
    (negative Lyapunov exponent) and `gain > 1` a chaotic one, the knob of the
    predictability studies. `U ~ N(0, 1/M)`, `b = 0`.

    **Arguments:**

    - `input_size`, `hidden_size`: `M` and `D`.
    - `gain`: the scale of the recurrent weights.
    - `use_bias`: whether to hold a bias `b` (initialised at zero).
    - `dtype`: float64 under x64, else float32 by default.
    - `key`: PRNG key (keyword only).
    """

    weight_hh: Float[Array, "D D"]
    weight_ih: Float[Array, "D M"]
    bias: Float[Array, " D"] | None
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        gain: float = 1.0,
        use_bias: bool = True,
        dtype=None,
        *,
        key: PRNGKeyArray,
    ):
        dtype = default_dtype(dtype)
        k_hh, k_ih = jax.random.split(key)
        self.weight_hh = (gain / math.sqrt(hidden_size)) * jax.random.normal(
            k_hh, (hidden_size, hidden_size), dtype
        )
        self.weight_ih = jax.random.normal(k_ih, (hidden_size, input_size), dtype) / math.sqrt(
            max(input_size, 1)
        )
        self.bias = jnp.zeros((hidden_size,), dtype) if use_bias else None
        self.input_size = input_size
        self.hidden_size = hidden_size

    def __call__(self, input_t: Float[Array, " M"], s: Float[Array, " D"]) -> Float[Array, " D"]:
        pre = self.weight_hh @ s + self.weight_ih @ input_t
        if self.bias is not None:
            pre = pre + self.bias
        return jnp.tanh(pre)

    def value_and_diagonal_jacobian(
        self, input_t: Float[Array, " M"], s: Float[Array, " D"]
    ) -> tuple[Float[Array, " D"], Float[Array, " D"]]:
        """`(s', diag ∂s'/∂s)`."""
        new = self(input_t, s)
        return new, (1 - new**2) * jnp.diagonal(self.weight_hh)

    def value_and_jacobian(
        self, input_t: Float[Array, " M"], s: Float[Array, " D"]
    ) -> tuple[Float[Array, " D"], Float[Array, "D D"]]:
        """`(s', ∂s'/∂s = diag(1 - s'²) W)`."""
        new = self(input_t, s)
        return new, (1 - new**2)[:, None] * self.weight_hh

    def diagonal_jacobian(
        self, input_t: Float[Array, " M"], s: Float[Array, " D"]
    ) -> Float[Array, " D"]:
        """Diagonal of `∂s'/∂s`: `(1 - s'²) ⊙ diag(W)`."""
        return self.value_and_diagonal_jacobian(input_t, s)[1]
