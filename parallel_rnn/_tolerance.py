"""Default tolerances, from the dtype of the state."""

import jax.numpy as jnp


def default_tolerances(dtype) -> tuple[float, float]:
    """`(rtol, atol)` for a state of this dtype.

    - float32: `32·eps` (3.8e-6). With the former 1e-5, converged float32 solves
      of trained, marginally stable models (largest Lyapunov exponent ≈ 0) ended
      1e-3 to 1e-1 away from sequential evaluation, because per-step residuals
      accumulate along the trajectory; at `32·eps` they end within about 3e-4.
      Tighter is not better: at `8·eps` the iterations on trained language
      models (`D = 128`) crawl at the round-off floor of the cell itself (DEER
      931 iterations instead of 38 on a char-GRU, QuasiDEER 1546 instead of 344).
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
        tol = 32 * eps
    else:  # 16-bit floats
        tol = 10 * eps
    return tol, tol
