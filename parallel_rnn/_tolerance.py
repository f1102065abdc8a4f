"""Default tolerances, from the dtype of the state."""

import jax.numpy as jnp


def default_tolerances(dtype) -> tuple[float, float]:
    """`(rtol, atol)` for a state of this dtype.

    - float32: `8·eps` (9.5e-7), i.e. a residual of a few ulps per step. With
      the former 1e-5, converged float32 solves of trained, marginally stable
      models (largest Lyapunov exponent ≈ 0, `T = 10⁴`) ended 1e-3 to 1e-1 away
      from sequential evaluation, because per-step residuals accumulate along
      the trajectory; at `8·eps` they end within about 1e-4.
    - float64: 1e-10 (converged solves agree with sequential evaluation to
      ~1e-8 on the same models); tighter values are within the round-off of a
      long parallel scan and make the last iterations crawl.
    - 16-bit floats: `10·eps`.

    The tolerance bounds the residual `|s_t - f(x_t, s_{t-1})|`, not the error
    against sequential evaluation: over long sequences that error is the
    residual amplified by the trajectory's sensitivity (see docs/trained-models.md).
    """
    eps = float(jnp.finfo(dtype).eps)
    if eps < 1e-12:  # float64
        tol = 1e-10
    elif eps < 1e-6:  # float32
        tol = 8 * eps
    else:  # 16-bit floats
        tol = 10 * eps
    return tol, tol
