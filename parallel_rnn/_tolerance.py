"""Default tolerances, from the dtype of the state."""

import jax.numpy as jnp


def default_tolerances(dtype) -> tuple[float, float]:
    """`(rtol, atol)` for a state of this dtype.

    About 80 ulps in float32 and 1e-10 in float64: tight enough that the answer
    agrees with sequential evaluation to ~1e-4 (float32) and ~1e-8 (float64) on
    contractive cells, loose enough to be reachable despite round-off in the scan.
    """
    eps = float(jnp.finfo(dtype).eps)
    if eps < 1e-12:  # float64
        tol = 1e-10
    elif eps < 1e-6:  # float32
        tol = 1e-5
    else:  # 16-bit floats
        tol = 10 * eps
    return tol, tol
