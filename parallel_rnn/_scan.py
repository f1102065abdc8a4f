"""Linear recurrences `x_t = A_t x_{t-1} + b_t`, the one primitive every solver uses.

Forward in time (`x_0 = 0`, so `x_1 = b_1`) or, with `reverse=True`, backward
(`x_{T+1} = 0`, `x_t = A_t x_{t+1} + b_t`), which is what the adjoint needs.
`A_t` is dense `(T, D, D)` or diagonal `(T, D)`.

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


Method = Literal["auto", "associative", "sequential"]

# The dense combine is a chain of matmuls; JAX's DEFAULT precision is TF32 on
# recent NVIDIA GPUs, which would cap DEER's accuracy near 1e-3.
_HIGHEST = lax.Precision.HIGHEST


def resolve_method(method: Method) -> Literal["associative", "sequential"]:
    if method == "auto":
        return "sequential" if jax.default_backend() == "cpu" else "associative"
    if method not in ("associative", "sequential"):
        raise ValueError(f"`method` must be 'auto', 'associative' or 'sequential', got {method!r}")
    return method


def _matvec(A, x):
    return jnp.einsum("...ij,...j->...i", A, x, precision=_HIGHEST)


def _dense_combine(earlier, later):
    A_i, b_i = earlier
    A_j, b_j = later
    return jnp.matmul(A_j, A_i, precision=_HIGHEST), _matvec(A_j, b_i) + b_j


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
) -> Float[Array, "T D"]:
    """Solve `x_t = A_t x_{t-1} + b_t` (`x_0 = 0`), or backwards with `reverse=True`.

    `A[0]` (`A[-1]` when reversed) multiplies the zero boundary value and is unused.
    """
    if resolve_method(method) == "sequential":
        # On CPU a tiny matvec as a dot is a library call per step; as a multiply
        # and a row sum it is one fused loop, about 1.5-3x faster up to D = 32
        # (measured at T = 1e5), slower beyond. Both are exact float products.
        matvec = _matvec if b.shape[-1] > 32 else lambda A_t, x: jnp.sum(A_t * x, axis=-1)

        def step(x, ab):
            A_t, b_t = ab
            x = matvec(A_t, x) + b_t
            return x, x

        _, xs = lax.scan(step, jnp.zeros_like(b[0]), (A, b), reverse=reverse)
        return xs

    # With reverse=True JAX scans the time-reversed elements, so "earlier" in
    # the combine means later in time, which is exactly the backward recurrence.
    _, xs = lax.associative_scan(_dense_combine, (A, b), reverse=reverse)
    return xs


def diagonal_recurrence(
    a: Float[Array, "T D"],
    b: Float[Array, "T D"],
    *,
    reverse: bool = False,
    method: Method = "auto",
) -> Float[Array, "T D"]:
    """Elementwise `x_t = a_t ⊙ x_{t-1} + b_t` (`x_0 = 0`), or backwards with `reverse=True`."""
    if resolve_method(method) == "sequential":

        def step(x, ab):
            a_t, b_t = ab
            x = a_t * x + b_t
            return x, x

        _, xs = lax.scan(step, jnp.zeros_like(b[0]), (a, b), reverse=reverse)
        return xs

    _, xs = lax.associative_scan(_diagonal_combine, (a, b), reverse=reverse)
    return xs


def prefix_sum(b: Float[Array, "T D"], *, reverse: bool = False) -> Float[Array, "T D"]:
    """`x_t = x_{t-1} + b_t`: the recurrence with `A_t = I` (Picard)."""
    return lax.cumsum(b, axis=0, reverse=reverse)
