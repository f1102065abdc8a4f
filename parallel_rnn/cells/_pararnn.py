"""GRU and LSTM with diagonal recurrent weights, after ParaRNN (Danieli et al., 2025).

ParaRNN makes the recurrent matrices of the GRU and the LSTM diagonal, so that
the Jacobian `∂new_state/∂state` is diagonal (GRU) or block-diagonal with one
`2×2` block per unit (LSTM's `(h_j, c_j)`). Newton's method (`DEER`) is then
exact at the cost of a diagonal (block) scan: `O(T·D)` memory and work per
iteration, and quadratic convergence. The cells declare that structure
(`jacobian_structure`), so `DEER` uses it without being told.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._misc import default_dtype


def _uniform(key, shape, bound, dtype):
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class ParaGRU(eqx.Module):
    """GRU with diagonal recurrent weights, after ParaRNN (Danieli et al., 2025).

    Called as `cell(input_t, h) -> h'`, with Equinox's gate layout and the
    recurrent matrices replaced by vectors `a_r, a_z, a_n` (rows of `weight_hh`):

        r = σ(W_ir x + b_r + a_r ⊙ h),   z = σ(W_iz x + b_z + a_z ⊙ h),
        n = tanh(W_in x + b_in + r ⊙ (a_n ⊙ h + b_hn)),   h' = n + z ⊙ (h - n).

    Units interact only through the input, so `∂h'/∂h` is diagonal:
    `α a_z + β a_r + γ a_n + z` with `α = (h-n) z(1-z)`,
    `β = (1-z)(1-n²)(a_n h + b_hn) r(1-r)`, `γ = (1-z)(1-n²) r`.

    **Arguments:** `input_size`, `hidden_size`, `use_bias=True`, `dtype=None`
    (float64 under x64, else float32), keyword-only `key`. Input weights and biases
    are drawn as in `eqx.nn.GRUCell` (uniform, `±1/√hidden_size`); the recurrent
    vectors uniform in `±1`.

    ??? cite "Reference"
        Danieli, Rodriguez, Sarabia, Suau, Zappella. *ParaRNN: Unlocking parallel
        training of nonlinear RNNs for large language models.* 2025.
    """

    weight_ih: Float[Array, "3D M"]
    weight_hh: Float[Array, "3 D"]
    bias: Float[Array, " 3D"] | None
    bias_n: Float[Array, " D"] | None
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)
    jacobian_structure = "diagonal"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        use_bias: bool = True,
        dtype=None,
        *,
        key: PRNGKeyArray,
    ):
        dtype = default_dtype(dtype)
        k_ih, k_hh, k_b, k_bn = jax.random.split(key, 4)
        lim = 1 / math.sqrt(hidden_size)
        self.weight_ih = _uniform(k_ih, (3 * hidden_size, input_size), lim, dtype)
        self.weight_hh = _uniform(k_hh, (3, hidden_size), 1.0, dtype)
        self.bias = _uniform(k_b, (3 * hidden_size,), lim, dtype) if use_bias else None
        self.bias_n = _uniform(k_bn, (hidden_size,), lim, dtype) if use_bias else None
        self.input_size = input_size
        self.hidden_size = hidden_size

    def value_and_diagonal_jacobian(
        self, input_t: Float[Array, " M"], h: Float[Array, " D"]
    ) -> tuple[Float[Array, " D"], Float[Array, " D"]]:
        """`(h', ∂h'/∂h)`, the Jacobian being diagonal, from one evaluation of the gates."""
        lin = self.weight_ih @ input_t
        if self.bias is not None:
            lin = lin + self.bias
        i_r, i_z, i_n = jnp.split(lin, 3)
        a_r, a_z, a_n = self.weight_hh
        r = jax.nn.sigmoid(i_r + a_r * h)
        z = jax.nn.sigmoid(i_z + a_z * h)
        c_n = a_n * h + (0 if self.bias_n is None else self.bias_n)
        n = jnp.tanh(i_n + r * c_n)
        new = n + z * (h - n)
        dn = (1 - z) * (1 - n**2)
        diag = (h - n) * z * (1 - z) * a_z + dn * c_n * r * (1 - r) * a_r + dn * r * a_n + z
        return new, diag

    def __call__(self, input_t: Float[Array, " M"], h: Float[Array, " D"]) -> Float[Array, " D"]:
        return self.value_and_diagonal_jacobian(input_t, h)[0]

    def diagonal_jacobian(
        self, input_t: Float[Array, " M"], h: Float[Array, " D"]
    ) -> Float[Array, " D"]:
        """`∂h'/∂h`, which is diagonal: returned as its `(D,)` diagonal."""
        return self.value_and_diagonal_jacobian(input_t, h)[1]


class ParaLSTM(eqx.Module):
    """LSTM with diagonal recurrent weights, after ParaRNN (Danieli et al., 2025).

    Called as `cell(input_t, (h, c)) -> (h', c')`, with Equinox's gate layout and
    the recurrent matrix replaced by vectors (rows of `weight_hh`, `(4, D)`):
    `[i, f, g, o] = split(W_ih x + b) + [a_i, a_f, a_g, a_o] ⊙ h` through
    `σ, σ, tanh, σ`, then `c' = f ⊙ c + i ⊙ g`, `h' = o ⊙ tanh(c')`.

    Unit `j`'s `(h'_j, c'_j)` depends only on `(h_j, c_j)` (and the input): the
    Jacobian is block-diagonal with the `2×2` blocks
    `[[∂h'/∂h, κ f], [∂c'/∂h, f]]`, `κ = o (1 - tanh² c')`,
    `∂c'/∂h = c f(1-f) a_f + g i(1-i) a_i + i(1-g²) a_g`,
    `∂h'/∂h = tanh(c') o(1-o) a_o + κ ∂c'/∂h`.

    **Arguments:** as for `ParaGRU`. The forget-gate bias starts at `+1`, the
    usual LSTM choice for long memory.

    ??? cite "Reference"
        Danieli, Rodriguez, Sarabia, Suau, Zappella. *ParaRNN: Unlocking parallel
        training of nonlinear RNNs for large language models.* 2025.
    """

    weight_ih: Float[Array, "4D M"]
    weight_hh: Float[Array, "4 D"]
    bias: Float[Array, " 4D"] | None
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)
    jacobian_structure = "block"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        use_bias: bool = True,
        dtype=None,
        *,
        key: PRNGKeyArray,
    ):
        dtype = default_dtype(dtype)
        k_ih, k_hh, k_b = jax.random.split(key, 3)
        lim = 1 / math.sqrt(hidden_size)
        D = hidden_size
        self.weight_ih = _uniform(k_ih, (4 * D, input_size), lim, dtype)
        self.weight_hh = _uniform(k_hh, (4, D), 1.0, dtype)
        if use_bias:
            forget = jnp.zeros((4, D), dtype).at[1].set(1).reshape(-1)
            self.bias = _uniform(k_b, (4 * D,), lim, dtype) + forget
        else:
            self.bias = None
        self.input_size = input_size
        self.hidden_size = hidden_size

    def value_and_block_jacobian(
        self, input_t: Float[Array, " M"], state: tuple[Array, Array]
    ) -> tuple[tuple[Array, Array], Float[Array, "D 2 2"]]:
        """`((h', c'), B)`, `B[j]` the `2×2` Jacobian of `(h'_j, c'_j)` in `(h_j, c_j)`."""
        h, c = state
        lin = self.weight_ih @ input_t
        if self.bias is not None:
            lin = lin + self.bias
        pre = jnp.split(lin, 4)
        a_i, a_f, a_g, a_o = self.weight_hh
        i = jax.nn.sigmoid(pre[0] + a_i * h)
        f = jax.nn.sigmoid(pre[1] + a_f * h)
        g = jnp.tanh(pre[2] + a_g * h)
        o = jax.nn.sigmoid(pre[3] + a_o * h)
        c_new = f * c + i * g
        tanh_c = jnp.tanh(c_new)
        kappa = o * (1 - tanh_c**2)
        dc_dh = c * f * (1 - f) * a_f + g * i * (1 - i) * a_i + i * (1 - g**2) * a_g
        dh_dh = tanh_c * o * (1 - o) * a_o + kappa * dc_dh
        top = jnp.stack([dh_dh, kappa * f], axis=-1)
        bottom = jnp.stack([dc_dh, f], axis=-1)
        return (o * tanh_c, c_new), jnp.stack([top, bottom], axis=-2)

    def __call__(
        self, input_t: Float[Array, " M"], state: tuple[Array, Array]
    ) -> tuple[Array, Array]:
        return self.value_and_block_jacobian(input_t, state)[0]

    def value_and_diagonal_jacobian(
        self, input_t: Float[Array, " M"], state: tuple[Array, Array]
    ) -> tuple[tuple[Array, Array], tuple[Array, Array]]:
        """`((h', c'), (∂h'_j/∂h_j, ∂c'_j/∂c_j))`: the diagonal of the blocks."""
        new, blocks = self.value_and_block_jacobian(input_t, state)
        return new, (blocks[:, 0, 0], blocks[:, 1, 1])

    def diagonal_jacobian(
        self, input_t: Float[Array, " M"], state: tuple[Array, Array]
    ) -> tuple[Array, Array]:
        """`(∂h'_j/∂h_j, ∂c'_j/∂c_j)`, the diagonal of the Jacobian."""
        return self.value_and_diagonal_jacobian(input_t, state)[1]
