"""Kalman filter and Rauch–Tung–Striebel smoother for the model ELK solves.

The linear-Gaussian state-space model (`t = 1..T`, `D`-dimensional):

    s_1 ~ N(b_1, I),    s_t | s_{t-1} ~ N(A_t s_{t-1} + b_t, I),    y_t | s_t ~ N(s_t, I/λ).

`A_1` multiplies nothing and is ignored. Its negative log joint is, up to constants,

    ½ Σ_t ‖s_t - A_t s_{t-1} - b_t‖² + (λ/2) Σ_t ‖s_t - y_t‖²     (s_0 = 0),

so the smoothed mean (the MAP, hence the posterior mean) is the minimiser of
that objective. ELK uses it for the *correction* `δ = s_new - s` of one
Levenberg–Marquardt step: `b_t = -r_t` and `y_t = 0` (`y=None` here). Working
with `δ` instead of absolute states keeps every quantity of the size of the
residual, which matters in float32 near convergence, where absolute states
would be differences of nearly equal numbers.

`λ` may differ per time step (`(T,)`). Everything is written with
`k = λ/(1+λ)` and `c = 1/(1+λ)` rather than the emission variance `σ² = 1/λ`, so
`λ = 0` (no observations: the plain linear recurrence, i.e. DEER) and `λ = inf`
(an exact observation `s_t = y_t`, which ELK uses to pin solved time steps) are
both exact and finite.

Two evaluation orders give the same posterior:

- `"associative"`: the parallel filter and smoother of Särkkä & García-Fernández,
  as `lax.associative_scan`s of the elements below (`O(log T)` depth);
- `"sequential"`: the textbook filter and RTS recursions, as `lax.scan`s (minimal
  work; the faster choice on a CPU).

`A` of shape `(T, D, D)` selects the dense form; `(T, D)` the diagonal form,
where every covariance stays diagonal and the model splits into `D` independent
scalar models, computed elementwise on `(T, D)` arrays.

Numerics: no explicit inverses (one LU solve per combine), covariances
re-symmetrised after every combine, and matmuls at `Precision.HIGHEST` (JAX's
default is TF32 on recent NVIDIA GPUs).

??? cite "Reference"
    Särkkä, García-Fernández. *Temporal parallelization of Bayesian smoothers.*
    IEEE Transactions on Automatic Control, 2021 (arXiv:1905.13002).
"""

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int, Scalar

from ._misc import add_identity, matmul as _mm, matvec as _mv
from ._scan import Method, _small_matvec, resolve_method
from ._shard import (
    associative_over_shards,
    global_length,
    sequence_axis,
    shift_left,
    time_index,
)


def _t(a):
    return jnp.swapaxes(a, -1, -2)


def _sym(a):
    return 0.5 * (a + _t(a))


def _gains(lam):
    # Written so that λ = 0 gives (0, 1) and λ = inf gives (1, 0) exactly.
    return 1 / (1 + 1 / lam), 1 / (1 + lam)


# ---------------------------------------------------------------------------
# Parallel filter: elements (A, b, C, J, η) of Särkkä & García-Fernández.
# With Q = I, R = I/λ, H = I: K = k I, A_el = c A_t, b_el = c b_t + k y_t,
# C_el = c I, η = k A_tᵀ (y_t - b_t), J = k A_tᵀ A_t; and for t = 1 (prior
# N(b_1, I)): A_el = 0, η = 0, J = 0.


def _dense_filter_combine(earlier, later):
    A_i, b_i, C_i, J_i, eta_i = earlier
    A_j, b_j, C_j, J_j, eta_j = later
    D = A_i.shape[-1]
    M = add_identity(_mm(C_i, J_j))
    rhs = jnp.concatenate([A_i, (b_i + _mv(C_i, eta_j))[..., None], _mm(C_i, _t(A_j))], axis=-1)
    # One factorisation for the three products with (I + C_i J_j)⁻¹; the two with
    # (I + J_j C_i)⁻¹ are its transpose since C and J are symmetric.
    X = jnp.linalg.solve(M, rhs)
    X_A, X_b, X_C = X[..., :D], X[..., D], X[..., D + 1 :]
    A = _mm(A_j, X_A)
    b = _mv(A_j, X_b) + b_j
    C = _sym(_mm(A_j, X_C) + C_j)
    eta = _mv(_t(X_A), eta_j - _mv(J_j, b_i)) + eta_i
    J = _sym(_mm(_mm(_t(X_A), J_j), A_i) + J_i)
    return A, b, C, J, eta


def _diagonal_filter_combine(earlier, later):
    A_i, b_i, C_i, J_i, eta_i = earlier
    A_j, b_j, C_j, J_j, eta_j = later
    denom = 1 + C_i * J_j
    A = A_i * A_j / denom
    b = A_j * (C_i * eta_j + b_i) / denom + b_j
    C = C_i * A_j**2 / denom + C_j
    eta = A_i * (eta_j - J_j * b_i) / denom + eta_i
    J = J_j * A_i**2 / denom + J_i
    return A, b, C, J, eta


def _filter_elements(A, b, y, k, c, dense):
    first = time_index(A.shape[0]) == 0  # global time when sequence-sharded
    innov = y - b
    k, c = k[:, None], c[:, None]
    if dense:
        D = b.shape[-1]
        A = jnp.where(first[:, None, None], 0, A)
        C = c[..., None] * jnp.eye(D, dtype=b.dtype)[None]
        J = k[..., None] * _mm(_t(A), A)
        return c[..., None] * A, c * b + k * y, C, J, k * _mv(_t(A), innov)
    A = jnp.where(first[:, None], 0, A)
    return c * A, c * b + k * y, jnp.broadcast_to(c, b.shape), k * A**2, k * A * innov


def _parallel_filter(A, b, y, k, c, dense, associative=True):
    elems = _filter_elements(A, b, y, k, c, dense)
    combine = _dense_filter_combine if dense else _diagonal_filter_combine
    if sequence_axis() is not None:
        _, m, P, _, _ = associative_over_shards(
            combine, elems, reverse=False, associative=associative
        )
        return m, P
    _, m, P, _, _ = lax.associative_scan(combine, elems)
    return m, P


# ---------------------------------------------------------------------------
# Parallel smoother: elements (E, g, L) from the filtered (m_t, P_t), with
# F = A_{t+1}, β = b_{t+1}: E = P Fᵀ (F P Fᵀ + I)⁻¹, g = m - E (F m + β),
# L = P - E F P; the last element is (0, m_T, P_T).


def _dense_smoother_combine(earlier, later):
    E_i, g_i, L_i = earlier
    E_j, g_j, L_j = later
    return _mm(E_i, E_j), _mv(E_i, g_j) + g_i, _sym(_mm(_mm(E_i, L_j), _t(E_i)) + L_i)


def _diagonal_smoother_combine(earlier, later):
    E_i, g_i, L_i = earlier
    E_j, g_j, L_j = later
    return E_i * E_j, E_i * g_j + g_i, E_i**2 * L_j + L_i


def _parallel_smoother(A, b, m, P, dense, associative=True):
    T = A.shape[0]
    last = (time_index(T) == global_length(T) - 1)[:, None]
    F = shift_left(A, A[-1])  # F_t = A_{t+1}; the last entry is masked
    beta = shift_left(b, b[-1])
    if dense:
        FP = _mm(F, P)
        S = add_identity(_mm(FP, _t(F)))
        # E = P Fᵀ S⁻¹ = (S⁻¹ F P)ᵀ, S and P symmetric.
        E = _t(jnp.linalg.solve(S, FP))
        E = jnp.where(last[..., None], 0, E)
        g = m - _mv(E, _mv(F, m) + beta)
        L = _sym(P - _mm(E, FP))
        combine = _dense_smoother_combine
    else:
        S = F**2 * P + 1
        E = jnp.where(last, 0, P * F / S)
        g = m - E * (F * m + beta)
        L = jnp.where(last, P, P / S)  # = P - E F P, written to stay positive
        combine = _diagonal_smoother_combine
    if sequence_axis() is not None:
        _, g, L = associative_over_shards(combine, (E, g, L), reverse=True, associative=associative)
        return g, L
    # JAX scans reversed elements in reverse mode, so the combine's first argument
    # is the later time step.
    _, g, L = lax.associative_scan(lambda j, i: combine(i, j), (E, g, L), reverse=True)
    return g, L


# ---------------------------------------------------------------------------
# Small dense algebra for the sequential recursions. On CPU every dot and every
# LAPACK call (`jnp.linalg.solve` is an LU factorisation and two triangular
# solves) in a scan body is a library call with a fixed cost per call, whatever
# D, and the LAPACK ones go to a multithreaded BLAS, which on a busy machine
# spends more time synchronising its threads than solving a 64×64 system.
# Every matrix solved here is symmetric positive definite with eigenvalues >= 1
# (I + λP⁻ and A P Aᵀ + I), for which elimination without pivoting is stable, so
# no LAPACK call is made:
# - up to D = 8 products are fused multiply-and-sums and solves Gauss–Jordan
#   sweeps in plain array ops;
# - below D = _BLOCKED solves are Gauss–Jordan sweeps that eliminate two
#   columns at a time (half as many dependent steps, each one fused loop):
#   at D = 16 the filter step costs about half what LAPACK's LU did;
# - from D = _BLOCKED the solve is a blocked Gauss–Jordan whose work is nearly
#   all XLA dots: as fast as single-threaded LAPACK at D = 64 and 128, and 2-4x
#   less CPU time than `jnp.linalg.solve` with the default BLAS threads on a
#   loaded machine (and it does not vary with the load).
# Measurements: docs/performance.md.

_SMALL = 8
_BLOCKED = 32  # from this D on, `_block_gauss_jordan`
_BLOCK = 16


def _gauss_jordan(M: Float[Array, "D D"], R: Float[Array, "D K"]) -> Float[Array, "D K"]:
    """`M⁻¹ R` for small SPD `M`: unrolled Gauss–Jordan without pivoting."""
    D = M.shape[-1]
    rows = jnp.arange(D)

    def eliminate(k, MR):
        M, R = MR
        pivot_row = M[k] / M[k, k]
        pivot_rhs = R[k] / M[k, k]
        col = jnp.where(rows == k, 0, M[:, k])  # every row but k loses its k-th entry
        M = M - col[:, None] * pivot_row[None, :]
        R = R - col[:, None] * pivot_rhs[None, :]
        return M.at[k].set(pivot_row), R.at[k].set(pivot_rhs)

    _, R = lax.fori_loop(0, D, eliminate, (M, R), unroll=True)
    return R


def _paired_gauss_jordan(M: Float[Array, "D D"], R: Float[Array, "D K"]) -> Float[Array, "D K"]:
    """`M⁻¹ R` for SPD `M`: Gauss–Jordan on `[M | R]` eliminating two columns per step.

    Each step solves the `2×2` pivot block in closed form on its two rows and
    subtracts their rank-2 update from the other rows: elementwise work that XLA
    fuses into a loop or two, so a `D×D` solve is about `D/2` small kernels.
    """
    D = M.shape[-1]
    X = jnp.concatenate([M, R], axis=-1)
    rows = jnp.arange(D)[:, None]
    for k in range(0, D, 2):
        n = min(2, D - k)
        pivot = X[k : k + n]
        if n == 2:
            a, b, c, d = X[k, k], X[k, k + 1], X[k + 1, k], X[k + 1, k + 1]
            det = a * d - b * c
            pivot = jnp.stack([d * pivot[0] - b * pivot[1], a * pivot[1] - c * pivot[0]]) / det
        else:
            pivot = pivot / X[k, k]
        col = jnp.where((rows >= k) & (rows < k + n), 0, X[:, k : k + n])
        X = X - jnp.sum(col[:, :, None] * pivot[None], axis=1)
        X = X.at[k : k + n].set(pivot)
    return X[:, D:]


def _block_gauss_jordan(M: Float[Array, "D D"], R: Float[Array, "D K"]) -> Float[Array, "D K"]:
    """`M⁻¹ R` for SPD `M`: Gauss–Jordan on `[M | R]` by blocks of `_BLOCK` rows.

    Each step makes one block row's diagonal block the identity (a small
    Gauss–Jordan) and eliminates that block column from every other row with one
    matrix product. The loop over blocks is a `fori_loop`, so the program (and its
    compile time) does not grow with `D`. `D` is padded with identity rows to a
    multiple of `_BLOCK`.
    """
    D, K = R.shape
    nb = min(_BLOCK, D)
    blocks = -(-D // nb)
    Dp = blocks * nb
    if Dp != D:
        M = jnp.pad(M, ((0, Dp - D), (0, Dp - D))) + jnp.diag(jnp.arange(Dp) >= D).astype(M.dtype)
        R = jnp.pad(R, ((0, Dp - D), (0, 0)))
    rows = jnp.arange(Dp)

    def eliminate(k, X):
        start = k * nb
        block_rows = lax.dynamic_slice_in_dim(X, start, nb, axis=0)
        pivot = lax.dynamic_slice_in_dim(block_rows, start, nb, axis=1)
        block_rows = _gauss_jordan(pivot, block_rows)
        col = lax.dynamic_slice_in_dim(X, start, nb, axis=1)
        col = jnp.where(((rows >= start) & (rows < start + nb))[:, None], 0, col)
        X = X - _mm(col, block_rows)
        return lax.dynamic_update_slice_in_dim(X, block_rows, start, axis=0)

    X = lax.fori_loop(0, blocks, eliminate, jnp.concatenate([M, R], axis=-1))
    return X[:D, Dp:]


def _spd_solve(M: Float[Array, "D D"], R: Float[Array, "D K"]) -> Float[Array, "D K"]:
    """`M⁻¹ R` for symmetric positive definite `M` (no pivoting; see above)."""
    D = M.shape[-1]
    if D <= _SMALL:
        return _gauss_jordan(M, R)
    if D >= _BLOCKED:
        return _block_gauss_jordan(M, R)
    return _paired_gauss_jordan(M, R)


# ---------------------------------------------------------------------------
# Sequential filter and RTS smoother. Information form of the update:
# P = (P⁻⁻¹ + λI)⁻¹ = (I + λP⁻)⁻¹ P⁻ and m = m⁻ + λ P (y - m⁻), which is exact and
# finite for λ = 0 and for large λ.


def _small_mm(a, b):
    if a.shape[-1] > _SMALL:
        return _mm(a, b)
    return jnp.sum(a[..., :, :, None] * b[..., None, :, :], axis=-2)


def _small_mv(a, x):
    return _mv(a, x) if a.shape[-1] > _SMALL else _small_matvec(a, x)


def _unpinned_start(pinned: Bool[Array, " T"]) -> Int[Array, ""]:
    """The length of the leading run of pinned steps (`T` if all are pinned)."""
    return jnp.where(jnp.all(pinned), pinned.shape[0], jnp.argmin(pinned))


def _sequential_filter(A, b, y, lam, dense):
    T, D = b.shape
    eye = jnp.eye(D, dtype=b.dtype)

    def update(m, P, A_t, b_t, y_t, lam_t):
        pinned = jnp.isinf(lam_t)
        lam = jnp.where(pinned, 0, lam_t)
        if dense and D < _BLOCKED:
            # One product for the mean and the covariance, A [P | m]; and with
            # M = I + λP⁻, P = M⁻¹P⁻ and m = m⁻ + λP(y - m⁻) = M⁻¹(m⁻ + λP⁻y): one
            # solve with D + 1 right-hand sides gives both. (From D = _BLOCKED on,
            # where the work is in the dots, the odd width D + 1 made them ~10%
            # slower: there the product and the solve are D wide.)
            AX = _small_mm(A_t, jnp.concatenate([P, m[:, None]], axis=-1))
            m_pred = AX[:, D] + b_t
            P_pred = _sym(_small_mm(AX[:, :D], _t(A_t))) + eye
            rhs = jnp.concatenate([P_pred, (m_pred + lam * _small_mv(P_pred, y_t))[:, None]], -1)
            X = _spd_solve(eye + lam * P_pred, rhs)
            P, m = _sym(X[:, :D]), X[:, D]
        elif dense:
            m_pred = _mv(A_t, m) + b_t
            P_pred = _sym(_mm(_mm(A_t, P), _t(A_t))) + eye
            P = _sym(_spd_solve(eye + lam * P_pred, P_pred))
            m = m_pred + lam * _mv(P, y_t - m_pred)
        else:
            m_pred = A_t * m + b_t
            P_pred = A_t**2 * P + 1
            P = P_pred / (1 + lam * P_pred)
            m = m_pred + lam * P * (y_t - m_pred)
        # λ_t = inf observes s_t exactly: posterior N(y_t, 0).
        m = jnp.where(pinned, y_t, m)
        P = jnp.where(pinned, 0, P)
        return m, P, m_pred, P_pred

    # ELK pins its solved prefix with λ_t = inf: there the posterior is N(y_t, 0)
    # whatever came before, so the dense recursion (D > _SMALL) starts after the
    # leading pinned steps, from m = y (or m_0 = 0), P = 0; pinned steps further
    # on go through `update`. This skips the O(D³) work on the whole solved
    # prefix at no cost per step (a `lax.cond` per step cost 15% of the dense
    # step at D = 16).
    # On the prefix the predictions are never read (the smoother's gain is 0
    # there); they are set to N(0, I). m_0 = 0, P_0 = 0 make the first
    # prediction N(b_1, I) whatever A_1 is.
    if not (dense and D > _SMALL):
        # Diagonal and small dense steps are cheaper than the loop's dynamic
        # indexing (QuasiELK's filter: 4x slower as a loop from the prefix).
        def step(carry, inp):
            m, P, m_pred, P_pred = update(*carry, *inp)
            return (m, P), (m, P, m_pred, P_pred)

        init = (jnp.zeros_like(b[0]), jnp.zeros(A.shape[1:], b.dtype))
        return lax.scan(step, init, (A, b, y, lam))[1]
    pinned = jnp.isinf(lam)
    start = _unpinned_start(pinned)
    m_init = jnp.where(start > 0, y[jnp.maximum(start - 1, 0)], 0)
    P_init = jnp.zeros(A.shape[1:], b.dtype)
    out = (
        jnp.where(pinned[:, None], y, 0),
        jnp.zeros((T, *A.shape[1:]), b.dtype),
        jnp.zeros_like(b),
        jnp.broadcast_to(eye, (T, *A.shape[1:])),
    )

    def body(t, carry):
        m, P, out = carry
        m, P, m_pred, P_pred = update(m, P, A[t], b[t], y[t], lam[t])
        out = tuple(o.at[t].set(v) for o, v in zip(out, (m, P, m_pred, P_pred)))
        return m, P, out

    _, _, out = lax.fori_loop(start, T, body, (m_init, P_init, out))
    return out


def _sequential_smoother(A, m, P, m_pred, P_pred, lam, dense):
    T = m.shape[0]

    def update(ms, Ps, m_t, P_t, F, mp, Pp):
        # A pinned step has P_t = 0, hence E = 0: the smoothed posterior is the
        # filtered one, N(m_t, 0), exactly.
        if dense:
            E = _t(_spd_solve(Pp, _small_mm(F, P_t)))  # P_t Fᵀ Pp⁻¹
            ms = m_t + _small_mv(E, ms - mp)
            Ps = _sym(P_t + _small_mm(_small_mm(E, Ps - Pp), _t(E)))
        else:
            E = P_t * F / Pp
            ms = m_t + E * (ms - mp)
            Ps = P_t + E**2 * (Ps - Pp)
        return ms, Ps

    if not (dense and m.shape[-1] > _SMALL):  # as in `_sequential_filter`

        def step(carry, inp):
            ms, Ps = update(*carry, *inp)
            return (ms, Ps), (ms, Ps)

        inp = (m[:-1], P[:-1], A[1:], m_pred[1:], P_pred[1:])
        _, (ms, Ps) = lax.scan(step, (m[-1], P[-1]), inp, reverse=True)
        return jnp.concatenate([ms, m[-1:]]), jnp.concatenate([Ps, P[-1:]])
    # Backwards from T - 1 down to the end of the pinned prefix, where the
    # smoothed posterior is the filtered one (see `_sequential_filter`).
    start = _unpinned_start(jnp.isinf(lam))

    def body(i, carry):
        t = T - 2 - (i - start)  # T - 2, T - 3, ..., start
        ms, Ps, out_m, out_P = carry
        ms, Ps = update(ms, Ps, m[t], P[t], A[t + 1], m_pred[t + 1], P_pred[t + 1])
        return ms, Ps, out_m.at[t].set(ms), out_P.at[t].set(Ps)

    _, _, ms, Ps = lax.fori_loop(start, T - 1, body, (m[-1], P[-1], m, P))
    return ms, Ps


# ---------------------------------------------------------------------------


def _prepare(A, b, lam, y):
    square = A.ndim == 2 or A.shape[2] == b.shape[1]
    if A.ndim not in (2, 3) or A.shape[:2] != b.shape or not square:
        raise ValueError(
            "`A` must have shape (T, D, D) or (T, D) and `b` shape (T, D); "
            f"got {A.shape}, {b.shape}"
        )
    y = jnp.zeros_like(b) if y is None else jnp.asarray(y, b.dtype)
    lam = jnp.broadcast_to(jnp.asarray(lam, b.dtype), b.shape[:1])
    return A.ndim == 3, jnp.asarray(A, b.dtype), lam, y


def kalman_filter(
    A: Float[Array, "T D D"] | Float[Array, "T D"],
    b: Float[Array, "T D"],
    lam: Scalar | Float[Array, " T"] | float,
    y: Float[Array, "T D"] | None = None,
    *,
    method: Method = "auto",
) -> tuple[Float[Array, "T D"], Float[Array, "T D D"] | Float[Array, "T D"]]:
    """Filtered means and covariances `p(s_t | y_{1:t})` of the model above.

    **Arguments:**

    - `A`: dynamics, dense `(T, D, D)` or diagonal `(T, D)`; `A[0]` is unused.
    - `b`: dynamics offsets `(T, D)`; `b[0]` is the prior mean of `s_1`.
    - `lam`: observation precision `λ >= 0` (may be traced): a scalar, or one per
      time step `(T,)`. `λ_t = inf` observes `s_t = y_t` exactly (ELK uses this to
      pin the time steps that are already solved).
    - `y`: observations `(T, D)`; `None` means zeros (the ELK correction).
    - `method`: `"auto"` (sequential on CPU), `"associative"` or `"sequential"`.

    **Returns:** `(means, covariances)`; covariances are `(T, D, D)` or, for
    diagonal `A`, their diagonals `(T, D)`.
    """
    dense, A, lam, y = _prepare(A, b, lam, y)
    associative = resolve_method(method) == "associative"
    # Sequence-sharded, the recursions run in element form, which composes over
    # shards (the method picks a parallel or a sequential scan of the elements).
    if not associative and sequence_axis() is None:
        m, P, _, _ = _sequential_filter(A, b, y, lam, dense)
        return m, P
    k, c = _gains(lam)
    return _parallel_filter(A, b, y, k, c, dense, associative)


def kalman_smoother(
    A: Float[Array, "T D D"] | Float[Array, "T D"],
    b: Float[Array, "T D"],
    lam: Scalar | Float[Array, " T"] | float,
    y: Float[Array, "T D"] | None = None,
    *,
    method: Method = "auto",
) -> tuple[Float[Array, "T D"], Float[Array, "T D D"] | Float[Array, "T D"]]:
    """Smoothed means and covariances `p(s_t | y_{1:T})` of the model above.

    The means minimise `½ Σ ‖s_t - A_t s_{t-1} - b_t‖² + (λ/2) Σ ‖s_t - y_t‖²`.
    Arguments and returns as for `kalman_filter`.
    """
    dense, A, lam, y = _prepare(A, b, lam, y)
    associative = resolve_method(method) == "associative"
    if not associative and sequence_axis() is None:
        m, P, m_pred, P_pred = _sequential_filter(A, b, y, lam, dense)
        return _sequential_smoother(A, m, P, m_pred, P_pred, lam, dense)
    k, c = _gains(lam)
    m, P = _parallel_filter(A, b, y, k, c, dense, associative)
    return _parallel_smoother(A, b, m, P, dense, associative)
