"""Linear recurrences `x_t = A_t x_{t-1} + b_t`, the one primitive every solver uses.

Forward in time (`x_0 = 0`, so `x_1 = b_1`) or, with `reverse=True`, backward
(`x_{T+1} = 0`, `x_t = A_t x_{t+1} + b_t`), which is what the adjoint needs.
`A_t` is dense `(T, D, D)`, diagonal `(T, D)`, block-diagonal `(T, n, k, k)`
(`D = k·n`, block `j` acting on the entries `j, n+j, …, (k-1)n+j`), or a gated
cell's factored dense Jacobian (`GatedJacobian`, `_gated.py`);
`linear_recurrence` dispatches on the type and the number of axes.

Two evaluation orders give the same answer:

* `"associative"`: `jax.lax.associative_scan` on the elements `(A_t, b_t)` with
  `(A_i, b_i) • (A_j, b_j) = (A_j A_i, A_j b_i + b_j)` (i earlier): `O(log T)`
  depth, about twice the work. This is what makes the solvers parallel on GPUs.
* `"sequential"`: a `lax.scan` over time, `O(T)` depth and minimal work. On a CPU
  with a couple of cores depth is worthless and this is several times faster.

`method="auto"` (the default) picks `"sequential"` on CPU and `"associative"`
elsewhere, at trace time.
"""

from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from . import _shard
from ._gated import GatedJacobian, step_products
from ._misc import HIGHEST as _HIGHEST, matvec as _matvec
from ._shard import shift_left


Method = Literal["auto", "associative", "sequential"]


def resolve_method(method: Method) -> Literal["associative", "sequential"]:
    if method == "auto":
        return "sequential" if jax.default_backend() == "cpu" else "associative"
    if method not in ("associative", "sequential"):
        raise ValueError(f"`method` must be 'auto', 'associative' or 'sequential', got {method!r}")
    return method


def _start(
    initial: Float[Array, " D"] | None, b: Float[Array, "T ..."], method: Method
) -> Float[Array, "..."]:
    """The scan's boundary value: `initial` (sequential form only), else zeros."""
    if initial is None:
        return jnp.zeros_like(b[0])
    if _shard.sequence_axis() is not None or resolve_method(method) != "sequential":
        raise ValueError("`initial` is only supported by the unsharded sequential recurrence")
    return initial.astype(b.dtype)


def _dense_combine(earlier, later):
    A_i, b_i = earlier
    A_j, b_j = later
    return jnp.matmul(A_j, A_i, precision=_HIGHEST), _matvec(A_j, b_i) + b_j


def _transposed_combine(earlier, later):
    # `_dense_combine` for elements stored as `A` but acting as `Aᵀ`: (A_j A_i)ᵀ = A_iᵀ A_jᵀ.
    A_i, b_i = earlier
    A_j, b_j = later
    return jnp.matmul(A_i, A_j, precision=_HIGHEST), _matvec(jnp.swapaxes(A_j, -1, -2), b_i) + b_j


def _small_matvec(A, x):
    # On CPU a tiny matvec as a dot is a library call per step; as a multiply
    # and a row sum it is one fused loop, 1.3-2.9x faster at D = 8..24 (measured
    # at T = 1e5) and slower from D = 48. Both are exact float products.
    return jnp.sum(A * x[..., None, :], axis=-1)


def _step_matvec(D: int):
    return _small_matvec if D <= 32 else _matvec


def _diagonal_combine(earlier, later):
    a_i, b_i = earlier
    a_j, b_j = later
    return a_j * a_i, a_j * b_i + b_j


def dense_recurrence(
    A: Float[Array, "T D D"],
    b: Float[Array, "T D"],
    *,
    reverse: bool = False,
    method: Method = "auto",
    initial: Float[Array, " D"] | None = None,
) -> Float[Array, "T D"]:
    """Solve `x_t = A_t x_{t-1} + b_t` (`x_0 = 0`), or backwards with `reverse=True`.

    `A[0]` (`A[-1]` when reversed) multiplies the zero boundary value and is unused.
    `initial` replaces that zero (`x_0`, or `x_{T+1}` reversed; unsharded and
    sequential only, as in every recurrence below), so `A[0]` multiplies it.
    """
    start = _start(initial, b, method)
    if _shard.sequence_axis() is not None:
        solve = lambda A, b: dense_recurrence(A, b, reverse=reverse, method=method)
        associative = resolve_method(method) == "associative"
        return _shard.linear_recurrence(
            "dense", solve, A, b, reverse=reverse, associative=associative
        )
    if resolve_method(method) == "sequential":
        matvec = _step_matvec(b.shape[-1])

        def step(x, ab):
            A_t, b_t = ab
            x = matvec(A_t, x) + b_t
            return x, x

        _, xs = lax.scan(step, start, (A, b), reverse=reverse)
        return xs

    # With reverse=True JAX scans the time-reversed elements, so "earlier" in
    # the combine means later in time, which is exactly the backward recurrence.
    _, xs = lax.associative_scan(_dense_combine, (A, b), reverse=reverse)
    return xs


def transposed_recurrence(
    A: Float[Array, "T ..."] | GatedJacobian,
    b: Float[Array, "T D"],
    *,
    method: Method = "auto",
) -> Float[Array, "T D"]:
    """Solve `x_t = b_t + A_{t+1}ᵀ x_{t+1}` backwards (`x_T = b_T`; `A[0]` unused).

    `A` dense `(T, D, D)`, or diagonal / block-diagonal / gated as for `linear_recurrence`.

    The adjoint of `dense_recurrence` (`λ_t = s̄_t + A_{t+1}ᵀ λ_{t+1}`), taking the
    forward Jacobians as they are, unshifted and untransposed: no copy of the
    `(T, D, D)` array is made. Through `μ_t = A_tᵀ x_t` it is the reverse
    recurrence `μ_t = A_tᵀ μ_{t+1} + A_tᵀ b_t`, and `x_t = b_t + μ_{t+1}`.
    """
    if isinstance(A, GatedJacobian):
        return _transposed_gated(A, b, method)
    if A.ndim != 3:
        return _transposed_structured(A, b, method)
    if _shard.sequence_axis() is not None:
        solve = lambda A, b: transposed_recurrence(A, b, method=method)
        associative = resolve_method(method) == "associative"
        return _shard.linear_recurrence(
            "transposed", solve, A, b, reverse=True, associative=associative
        )
    D = b.shape[-1]
    if resolve_method(method) == "sequential":
        matvec = _step_matvec(D)

        def step(mu_next, ab):
            A_t, b_t = ab
            x = b_t + mu_next
            return matvec(A_t.T, x), x

        _, xs = lax.scan(step, jnp.zeros_like(b[0]), (A, b), reverse=True)
        return xs

    c = jnp.einsum("tji,tj->ti", A, b, precision=_HIGHEST)
    _, mu = lax.associative_scan(_transposed_combine, (A, c), reverse=True)
    return b + shift_left(mu, jnp.zeros_like(mu[0]))


def diagonal_recurrence(
    a: Float[Array, "T D"],
    b: Float[Array, "T D"],
    *,
    reverse: bool = False,
    method: Method = "auto",
    initial: Float[Array, " D"] | None = None,
) -> Float[Array, "T D"]:
    """Elementwise `x_t = a_t ⊙ x_{t-1} + b_t` (`x_0 = 0`), or backwards with `reverse=True`."""
    start = _start(initial, b, method)
    if _shard.sequence_axis() is not None:
        solve = lambda a, b: diagonal_recurrence(a, b, reverse=reverse, method=method)
        return _shard.linear_recurrence("diagonal", solve, a, b, reverse=reverse, associative=False)
    if resolve_method(method) == "sequential":

        def step(x, ab):
            a_t, b_t = ab
            x = a_t * x + b_t
            return x, x

        _, xs = lax.scan(step, start, (a, b), reverse=reverse)
        return xs

    _, xs = lax.associative_scan(_diagonal_combine, (a, b), reverse=reverse)
    return xs


def _to_blocks(b: Float[Array, "T D"], n: int) -> Float[Array, "T n k"]:
    return jnp.swapaxes(b.reshape(b.shape[0], -1, n), 1, 2)


def _from_blocks(x: Float[Array, "T n k"]) -> Float[Array, "T D"]:
    return jnp.swapaxes(x, 1, 2).reshape(x.shape[0], -1)


def _block_combine(earlier, later):
    A_i, b_i = earlier
    A_j, b_j = later
    return jnp.matmul(A_j, A_i, precision=_HIGHEST), _small_matvec(A_j, b_i) + b_j


def block_recurrence(
    A: Float[Array, "T n k k"],
    b: Float[Array, "T D"],
    *,
    reverse: bool = False,
    method: Method = "auto",
    initial: Float[Array, " D"] | None = None,
) -> Float[Array, "T D"]:
    """`x_t = A_t x_{t-1} + b_t` (`x_0 = 0`) with block-diagonal `A_t`, `O(T·D·k)` memory.

    `A[:, j]` is the `k×k` block acting on the entries `j, n+j, …, (k-1)n+j` of
    `x_t` (`n = A.shape[1]`): for a state of `k` leaves of size `n`, unit `j` of
    every leaf. The associative form combines the blocks, `O(T·n·k³)` work.
    """
    n = A.shape[1]
    start = _to_blocks(_start(initial, b, method)[None], n)[0]
    if _shard.sequence_axis() is not None:
        solve = lambda A, b: block_recurrence(A, b, reverse=reverse, method=method)
        associative = resolve_method(method) == "associative"
        return _shard.linear_recurrence(
            "block", solve, A, b, reverse=reverse, associative=associative
        )
    bb = _to_blocks(b, n)
    if resolve_method(method) == "sequential":
        # k is small: a multiply and a sum fuse into one loop (see `_small_matvec`).
        def step(x, ab):
            A_t, b_t = ab
            x = _small_matvec(A_t, x) + b_t
            return x, x

        _, xs = lax.scan(step, start, (A, bb), reverse=reverse)
        return _from_blocks(xs)

    _, xs = lax.associative_scan(_block_combine, (A, bb), reverse=reverse)
    return _from_blocks(xs)


def gated_recurrence(
    A: GatedJacobian,
    b: Float[Array, "T D"],
    *,
    reverse: bool = False,
    method: Method = "auto",
    initial: Float[Array, " D"] | None = None,
) -> Float[Array, "T D"]:
    """`x_t = A_t x_{t-1} + b_t` (`x_0 = 0`) with `A_t` in gated form, `O(T·D·K)` memory.

    Sequentially each step is one matvec with the stacked weights plus elementwise
    work, and no `D×D` matrix is formed. The associative scan (and the
    sequence-sharded one) combine dense matrices, so there `A` is densified.
    """
    start = _start(initial, b, method)
    if _shard.sequence_axis() is not None or resolve_method(method) == "associative":
        return dense_recurrence(A.dense(), b, reverse=reverse, method=method)
    matvec, _ = step_products(A.weight, A.size)

    def step(x, cbb):
        c_t, B_t, b_t = cbb
        x = matvec(c_t, B_t, x) + b_t
        return x, x

    _, xs = lax.scan(step, start, (A.coeffs, A.blocks, b), reverse=reverse)
    return xs


def linear_recurrence(
    A: Float[Array, "T ..."] | GatedJacobian,
    b: Float[Array, "T D"],
    *,
    reverse: bool = False,
    method: Method = "auto",
    initial: Float[Array, " D"] | None = None,
) -> Float[Array, "T D"]:
    """`x_t = A_t x_{t-1} + b_t` for `A` diagonal `(T, D)`, dense `(T, D, D)`,
    block-diagonal `(T, n, k, k)` or a `GatedJacobian`; from `x_0 = initial`
    (sequential only) instead of 0 when given."""
    if isinstance(A, GatedJacobian):
        return gated_recurrence(A, b, reverse=reverse, method=method, initial=initial)
    solve = {2: diagonal_recurrence, 3: dense_recurrence, 4: block_recurrence}.get(A.ndim)
    if solve is None:
        raise ValueError(f"`A` must have 2, 3 or 4 axes; got shape {A.shape}")
    return solve(A, b, reverse=reverse, method=method, initial=initial)


def _transposed_structured(A, b, method):
    # x_t = b_t + A_{t+1}ᵀ x_{t+1} is the reverse recurrence with A'_t = A_{t+1}ᵀ
    # (A'_T unused); for diagonal and block A the shifted copy is O(T·D·k).
    A_next = jnp.concatenate([A[1:], jnp.zeros_like(A[:1])], axis=0)
    if A.ndim == 4:
        A_next = jnp.swapaxes(A_next, -1, -2)
    return linear_recurrence(A_next, b, reverse=True, method=method)


def _transposed_gated(A: GatedJacobian, b, method):
    if _shard.sequence_axis() is not None or resolve_method(method) == "associative":
        return transposed_recurrence(A.dense(), b, method=method)
    _, rmatvec = step_products(A.weight, A.size)

    def step(mu_next, cbb):
        # As the dense sequential form: μ_t = A_tᵀ x_t, x_t = b_t + μ_{t+1}.
        c_t, B_t, b_t = cbb
        x = b_t + mu_next
        return rmatvec(c_t, B_t, x), x

    _, xs = lax.scan(step, jnp.zeros_like(b[0]), (A.coeffs, A.blocks, b), reverse=True)
    return xs


def prefix_sum(b: Float[Array, "T D"], *, reverse: bool = False) -> Float[Array, "T D"]:
    """`x_t = x_{t-1} + b_t`: the recurrence with `A_t = I` (Picard)."""
    if _shard.sequence_axis() is not None:
        solve = lambda _, b: prefix_sum(b, reverse=reverse)
        return _shard.linear_recurrence("sum", solve, None, b, reverse=reverse, associative=False)
    return lax.cumsum(b, axis=0, reverse=reverse)
