"""Jacobians of gated cells in factored form: `O(T·D·K)` numbers instead of `T·D·D`.

The Jacobian of a gated cell (GRU, LSTM) is a few row-scaled copies of its
recurrent weight matrix plus a local part:

    A_t δ = Σ_k coeffs[t, k] ⊙ tile_p(W_k δ[:m]) + blockdiag(blocks[t]) δ

with `weight = [W_1; …; W_K]` the `(K·m, m)` stacked recurrent weights (shared by
all steps), acting on the first `m` entries of the flat state, their outputs
repeated `p = D / m` times (`tile_p`) and scaled row by row by `coeffs[t]`
(`(K, D)`), and `blocks[t]` an `(n, k, k)` block-diagonal matrix in the strided
layout of `_structure.py` (`n·k = D`, block `j` acting on the flat entries
`j, n+j, …, (k-1)n+j`). The GRU is `m = D`, `p = 1`, `k = 1` (`blocks = z`); the
LSTM's `(h, c)` is `m = n`, `p = 2`, `k = 2` (`∂h'/∂c` and `∂c'/∂c` are diagonal).

Applied step by step (`matvec`, `rmatvec`), each product is one matvec with the
stacked weight plus elementwise work: the sequential scans never build the
`(T, D, D)` array. Whatever needs dense matrices (the associative scan, ELK,
the sequence-sharded solve) calls `dense()`.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._misc import matvec as _matvec


class GatedJacobian(eqx.Module):
    """`A_t δ = Σ_k coeffs[t,k] ⊙ tile_p(W_k δ[:m]) + blockdiag(blocks[t]) δ` (module docstring).

    One step (as a cell's `value_and_gated_jacobian` returns it): `weight`
    `(K·m, m)`, `coeffs` `(K, D)`, `blocks` `(n, k, k)`; over a trajectory the
    last two gain a leading `T` axis and `weight` stays shared.
    """

    weight: Float[Array, "Km m"]
    coeffs: Float[Array, "*T K D"]
    blocks: Float[Array, "*T n k k"]

    @property
    def size(self) -> int:
        """`D`, the flat state size."""
        return self.coeffs.shape[-1]

    def astype(self, dtype) -> "GatedJacobian":
        return GatedJacobian(*(x.astype(dtype) for x in (self.weight, self.coeffs, self.blocks)))

    def dense(self) -> Float[Array, "*T D D"]:
        """The Jacobians as dense `(…, D, D)` matrices."""
        K, D = self.coeffs.shape[-2:]
        m = self.weight.shape[1]
        W = jnp.tile(self.weight.reshape(K, m, m), (1, D // m, 1))  # (K, D, m): tile_p W_k
        lead = (1,) * (self.coeffs.ndim - 2)
        # A sum of K row-scaled copies, which XLA fuses into one elementwise pass
        # (as a contraction over k it became a batched dot, 50x slower on CPU).
        scaled = [self.coeffs[..., k, :, None] * W[k].reshape(*lead, D, m) for k in range(K)]
        rows = functools.reduce(jnp.add, scaled)
        if m < D:
            rows = jnp.concatenate([rows, jnp.zeros((*rows.shape[:-1], D - m), rows.dtype)], -1)
        return rows + blocks_to_dense(self.blocks)

    def diagonal(self) -> Float[Array, "*T D"]:
        """The diagonals of the Jacobians, `(…, D)`, without building them."""
        K, D = self.coeffs.shape[-2:]
        m = self.weight.shape[1]
        w = jnp.diagonal(self.weight.reshape(K, m, m), axis1=1, axis2=2)  # (K, m)
        # Row i >= m of tile_p(W_k) E multiplies δ[i mod m], never δ[i].
        w = jnp.concatenate([w, jnp.zeros((K, D - m), w.dtype)], axis=1)
        # A sum of K products, fused into one elementwise pass (as a reduction over
        # the middle axis XLA:CPU took 35 ms at D = 16, T = 1e5, 2.5 cell evaluations).
        lead = (1,) * (self.coeffs.ndim - 2)
        scaled = [self.coeffs[..., k, :] * w[k].reshape(*lead, D) for k in range(K)]
        return functools.reduce(jnp.add, scaled) + blocks_to_diagonal(self.blocks)


def blocks_to_diagonal(blocks: Float[Array, "... n k k"]) -> Float[Array, "... D"]:
    """Diagonal of the block-diagonal matrix in the flat order (`D = k·n`)."""
    d = jnp.diagonal(blocks, axis1=-2, axis2=-1)  # (..., n, k)
    return jnp.swapaxes(d, -1, -2).reshape(*d.shape[:-2], -1)


def blocks_to_dense(blocks: Float[Array, "... n k k"]) -> Float[Array, "... D D"]:
    """The `(D, D)` block-diagonal matrix of `(n, k, k)` blocks (strided layout)."""
    n, k = blocks.shape[-3], blocks.shape[-1]
    if k == 1:  # a diagonal, written as a product with the identity that XLA fuses
        lead = (1,) * (blocks.ndim - 3)
        return blocks[..., 0] * jnp.eye(n, dtype=blocks.dtype).reshape(*lead, n, n)
    eye = jnp.eye(n, dtype=blocks.dtype).reshape((1,) * (blocks.ndim - 2) + (n, 1, n))
    # J[a n + j, b n + l] = blocks[j, a, b] δ_jl: a broadcast product, no contraction.
    J = jnp.swapaxes(blocks, -3, -2)[..., None] * eye  # [a, j, b, l]
    return J.reshape(*blocks.shape[:-3], n * k, n * k)


def step_products(weight: Float[Array, "Km m"], D: int):
    """`(matvec, rmatvec)`: `A_t x` and `A_tᵀ y` of one step, from `(coeffs_t, blocks_t)`.

    The weight's transpose is formed here, outside any scan body.
    """
    Km, m = weight.shape
    K, p = Km // m, D // m

    def blocks_product(blocks, x, transpose):
        n, k = blocks.shape[0], blocks.shape[-1]
        if k == 1:  # a diagonal: no layout changes
            return blocks[:, 0, 0] * x
        xb = x.reshape(k, n).T  # (n, k): unit j's entries
        B = jnp.swapaxes(blocks, -1, -2) if transpose else blocks
        return jnp.sum(B * xb[:, None, :], axis=-1).T.reshape(-1)

    # The weight product as a dot even for small D: inside a scan step on CPU it
    # measured faster than a multiply and a row sum (D = 16, T = 1e5: 10.5 ms
    # against 31 ms for the whole scan; the dense scan's step takes 18 ms).
    # Tried and left out: `δ[:m]ᵀ Wᵀ` (a row times the pre-transposed weight),
    # 10-15% faster for the whole scan (GRU D = 16, 64; LSTM flat 32, 128), but
    # its other summation order changed DEER's iteration count on an expanding
    # GRU (experiments.convergence --quick, gru_unstable: 82 -> 97; 138 -> 145 at
    # D = 32); and unrolling the scan (unroll = 2..16), 1.5-3x slower on XLA:CPU.
    weight_t = weight.T

    def matvec(coeffs, blocks, x):
        u = _matvec(weight, x[:m]).reshape(K, 1, m)  # W_k δ[:m]
        gated = jnp.sum(coeffs.reshape(K, p, m) * u, axis=0).reshape(D)
        return gated + blocks_product(blocks, x, False)

    def rmatvec(coeffs, blocks, y):
        v = jnp.sum(coeffs.reshape(K, p, m) * y.reshape(1, p, m), axis=1)  # (K, m)
        top = _matvec(weight_t, v.reshape(K * m))  # Σ_k W_kᵀ v_k
        gated = jnp.concatenate([top, jnp.zeros((D - m,), top.dtype)])
        return gated + blocks_product(blocks, y, True)

    return matvec, rmatvec


def check_gated(jac: object, D: int, name: str) -> None:
    """Shapes of one step's `GatedJacobian` (from `eqx.filter_eval_shape`); `name`
    (quoted as it should appear) says which function returned it."""
    ok = False
    if isinstance(jac, GatedJacobian):
        arrays = (jac.weight, jac.coeffs, jac.blocks)
        w, c, b = (tuple(getattr(x, "shape", ())) for x in arrays)
        ok = (
            len(w) == 2
            and len(c) == 2
            and len(b) == 3
            and c[1] == D
            and w[1] > 0
            and D % w[1] == 0
            and w[0] == c[0] * w[1]
            and b[1] == b[2]
            and b[0] * b[1] == D
            and all(jnp.issubdtype(x.dtype, jnp.floating) for x in arrays)
        )
    if not ok:
        raise ValueError(
            f"{name} must return (new_state, GatedJacobian(weight (K·m, m), coeffs (K, D), "
            f"blocks (n, k, k))) with D = {D} = p·m = n·k, all floating; got {jac!r}"
        )


def vmap_gated(f, *args):
    """`jax.vmap(f)(*args)` for `f -> (value, GatedJacobian)`, keeping the weight unbatched.

    The weight is the cell's and must not depend on the step (jax raises otherwise).
    """
    out_axes = (0, GatedJacobian(None, 0, 0))  # pyright: ignore[reportArgumentType]
    return jax.vmap(f, out_axes=out_axes)(*args)


def is_dense(jac: object) -> bool:
    """Whether `jac` is a trajectory of dense Jacobians: `(T, D, D)` or gated."""
    return isinstance(jac, GatedJacobian) or getattr(jac, "ndim", None) == 3


def dense_diagonal(jac: "Float[Array, 'T D D'] | GatedJacobian") -> Float[Array, "T D"]:
    """The `(T, D)` diagonals of a trajectory of dense Jacobians (`is_dense`)."""
    if isinstance(jac, GatedJacobian):
        return jac.diagonal()
    return jnp.diagonal(jac, axis1=1, axis2=2)
