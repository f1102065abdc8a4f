"""Analytic vs autodiff Jacobian diagonal in QuasiDEER, on `cells.GRU`; solvers on `ImplicitSSM`.

For each hidden size `D` and length `T`, the same QuasiDEER solve (float32) is
timed and its compiled peak memory measured twice: with the cell's closed-form
`diagonal_jacobian` (one gate evaluation, `O(D)` extra work per step), and with
the cell hidden behind a wrapper that has no `diagonal_jacobian`, so the library
falls back to `D` JVP passes. Both solves do the same iterations (same diagonal
up to round-off), so the ratios isolate the cost of the diagonal.

Second table: the outer iterations DEER, QuasiDEER, Picard and Jacobi need on
`cells.ImplicitSSM` (T = 1000, D = K = 8; T = 200 with `--quick`), in float64 and
float32, with the error against sequential evaluation.

    python -m experiments.bench_diagonal [--quick] [--out results] [--reps 5]
"""

import argparse

import equinox as eqx
import jax
import jax.numpy as jnp

import parallel_rnn as prnn
from parallel_rnn import cells

from ._common import compiled_memory, format_table, parser, progress, time_fn, write_csv


class _NoDiagonal(eqx.Module):
    """The same cell, without `diagonal_jacobian`: the solvers must use autodiff."""

    cell: eqx.Module

    def __call__(self, x, h):
        return self.cell(x, h)


@eqx.filter_jit
def _solve(cell, xs, h0):
    sol = prnn.solve_parallel(cell, xs, h0, prnn.QuasiDEER(), throw=False)
    return sol.states, sol.num_steps, sol.converged


def _measure(cell, xs, h0, reps):
    states, steps, converged = _solve(cell, xs, h0)
    seconds, _ = time_fn(lambda: _solve(cell, xs, h0)[0], reps=reps, warmup=0)
    memory = compiled_memory(_solve, cell, xs, h0)
    return seconds, memory, int(steps), bool(converged), states


def implicit_ssm_iterations(
    T: int = 1000,
    D: int = 8,
    K: int = 8,
    M: int = 4,
    dtypes=(jnp.float64, jnp.float32),
    solvers=("DEER", "QuasiDEER", "Picard", "Jacobi"),
) -> list[dict]:
    """Outer iterations each solver needs on `cells.ImplicitSSM` (float64 and float32)."""
    rows = []
    for dtype in dtypes:
        cell = cells.ImplicitSSM(M, D, K, dtype=dtype, key=jax.random.key(0))
        xs = jax.random.normal(jax.random.key(1), (T, M), dtype)
        s0 = jnp.zeros(D, dtype)
        reference = prnn.solve_sequential(cell, xs, s0)
        for solver in (getattr(prnn, name)() for name in solvers):
            solve = eqx.filter_jit(
                lambda c, x, s, solver=solver: prnn.solve_parallel(c, x, s, solver, throw=False)
            )
            sol = solve(cell, xs, s0)
            seconds, _ = time_fn(lambda: solve(cell, xs, s0).states, reps=3, warmup=0)
            rows.append(
                dict(
                    dtype=jnp.dtype(dtype).name,
                    solver=type(solver).__name__,
                    T=T,
                    D=D,
                    K=K,
                    iterations=int(sol.num_steps),
                    converged=bool(sol.converged),
                    max_err_vs_sequential=float(jnp.max(jnp.abs(sol.states - reference))),
                    time_s=seconds,
                )
            )
    return rows


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    # The ImplicitSSM table needs float64; the GRU study passes float32 explicitly.
    jax.config.update("jax_enable_x64", True)
    sizes = (4,) if args.smoke else (16, 64) if args.quick else (16, 64, 256)
    lengths = (200,) if args.smoke else (10_000,) if args.quick else (10_000, 100_000)
    reps = 1 if args.smoke else args.reps or (3 if args.quick else 5)
    dtype = jnp.float32

    rows = []
    for D in progress(sizes, desc="D"):
        for T in lengths:
            cell = cells.GRU(D, D, dtype=dtype, key=jax.random.key(D))
            xs = jax.random.normal(jax.random.key(1), (T, D), dtype)
            h0 = jnp.zeros(D, dtype)
            t_an, m_an, n_an, ok_an, s_an = _measure(cell, xs, h0, reps)
            t_ad, m_ad, n_ad, ok_ad, s_ad = _measure(_NoDiagonal(cell), xs, h0, reps)
            rows.append(
                dict(
                    D=D,
                    T=T,
                    steps_analytic=n_an,
                    steps_autodiff=n_ad,
                    converged=ok_an and ok_ad,
                    time_analytic_s=t_an,
                    time_autodiff_s=t_ad,
                    time_ratio=t_ad / t_an,
                    time_per_step_ratio=(t_ad / n_ad) / (t_an / n_an),
                    mem_analytic_mb=None if m_an is None else m_an / 2**20,
                    mem_autodiff_mb=None if m_ad is None else m_ad / 2**20,
                    mem_ratio=None if (m_an is None or m_ad is None) else m_ad / m_an,
                    max_state_diff=float(jnp.max(jnp.abs(s_an - s_ad))),
                )
            )
    print(
        f"QuasiDEER on cells.GRU, float32, {jax.devices()[0].platform}; "
        "ratios = autodiff / analytic"
    )
    print(format_table(rows))
    path = args.out / "bench_diagonal.csv"
    write_csv(path, rows)
    print(f"wrote {path}")

    if args.smoke:
        implicit = implicit_ssm_iterations(T=20, dtypes=(jnp.float64,), solvers=("QuasiDEER",))
    else:
        implicit = implicit_ssm_iterations(T=200 if args.quick else 1000)
    print("\nOuter iterations on cells.ImplicitSSM (default tolerances; max_steps = T)")
    print(format_table(implicit))
    path = args.out / "implicit_ssm_iterations.csv"
    write_csv(path, implicit)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
