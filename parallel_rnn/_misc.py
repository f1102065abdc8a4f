"""Small numerical helpers shared across the package."""

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float


# JAX's DEFAULT matmul precision is TF32 on recent NVIDIA GPUs, which would cap
# DEER's (and the Kalman smoother's) accuracy near 1e-3: every product of
# Jacobians asks for full precision.
HIGHEST = lax.Precision.HIGHEST


def matmul(a: Array, b: Array) -> Array:
    """`a @ b` (batched over leading axes) at full float precision."""
    return jnp.matmul(a, b, precision=HIGHEST)


def matvec(a: Float[Array, "... D K"], x: Float[Array, "... K"]) -> Float[Array, "... D"]:
    """`a x` (batched over leading axes) at full float precision."""
    return jnp.einsum("...ij,...j->...i", a, x, precision=HIGHEST)


def default_dtype(dtype):
    """`dtype`, or float64 when x64 is on and float32 otherwise (as Equinox's layers do)."""
    return jax.dtypes.canonicalize_dtype(jnp.float64) if dtype is None else dtype


def add_identity(a: Float[Array, "... D D"]) -> Float[Array, "... D D"]:
    """`a + I` for a (batch of) square matrices, without implicit rank promotion."""
    D = a.shape[-1]
    return a + jnp.eye(D, dtype=a.dtype).reshape((1,) * (a.ndim - 2) + (D, D))
