"""Analytic vs autodiff Jacobian diagonal in QuasiDEER, on `cells.GRU`; solvers on `ImplicitSSM`.

For each hidden size `D` and length `T`, the same QuasiDEER solve (float32) is
timed and its compiled peak memory measured twice: with the cell's closed-form
`diagonal_jacobian` (one gate evaluation, `O(D)` extra work per step), and with
the cell hidden behind a wrapper that has no `diagonal_jacobian`, with the library's
jaxpr-derived diagonal switched off (`_jaxpr_diagonal.ENABLED`), so that it falls
back to `D` JVP passes. Both solves do the same iterations (same diagonal
up to round-off), so the ratios isolate the cost of the diagonal.

Second table: the outer iterations DEER, QuasiDEER, Picard and Jacobi need on
`cells.ImplicitSSM` (T = 1000, D = K = 8; T = 200 with `--quick`), in `--dtype`
(float32 by default; `--dtype float64` for double precision), with the error
against sequential evaluation.

Writes `bench_diagonal.csv`, `implicit_ssm_iterations.csv` and
`bench_diagonal.png` (time and memory ratio, autodiff / analytic, against `D`).

    python -m experiments.bench_diagonal [--quick] [--out results] [--reps 5] [--dtype float64]
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp

import parallel_rnn as prnn
from parallel_rnn import _jaxpr_diagonal, cells

from ._common import (
    by_mode,
    compiled_memory,
    dtype_scope,
    format_table,
    parse,
    progress,
    pyplot,
    save_figure,
    study_parser,
    time_fn,
    write_csv,
)


class _NoDiagonal(eqx.Module):
    """The same cell, without `diagonal_jacobian`: the solvers must use autodiff."""

    cell: Callable

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
    dtypes=(jnp.float32,),
    solvers=("DEER", "QuasiDEER", "Picard", "Jacobi"),
) -> list[dict]:
    """Outer iterations each solver needs on `cells.ImplicitSSM`, in each of `dtypes`."""
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
                    num_steps=int(sol.num_steps),
                    converged=bool(sol.converged),
                    max_abs_err=float(jnp.max(jnp.abs(sol.states - reference))),
                    time_s=seconds,
                )
            )
    return rows


def run(args) -> list[dict]:
    """The analytic-vs-autodiff rows, one per `(D, T)`."""
    sizes = args.D or by_mode(args, smoke=(4,), quick=(16, 64), full=(16, 64, 256))
    lengths = args.T or by_mode(args, smoke=(200,), quick=(10_000,), full=(10_000, 100_000))
    reps = args.reps or by_mode(args, smoke=1, quick=3, full=5)
    dtype = jnp.dtype(args.dtype)
    rows = []
    for D in progress(sizes, desc="D"):
        for T in lengths:
            key = jax.random.fold_in(jax.random.key(args.seed), D)
            cell = cells.GRU(D, D, dtype=dtype, key=key)  # pyright: ignore[reportCallIssue]
            xs = jax.random.normal(jax.random.key(args.seed + 1), (T, D), dtype)
            h0 = jnp.zeros(D, dtype)
            t_an, m_an, n_an, ok_an, s_an = _measure(cell, xs, h0, reps)
            # This study is about the `D`-JVP fallback, not the jaxpr-derived diagonal.
            _jaxpr_diagonal.ENABLED = False
            try:
                t_ad, m_ad, n_ad, ok_ad, s_ad = _measure(_NoDiagonal(cell), xs, h0, reps)
            finally:
                _jaxpr_diagonal.ENABLED = True
            rows.append(
                dict(
                    solver="QuasiDEER",
                    dtype=dtype.name,
                    D=D,
                    T=T,
                    num_steps_analytic=n_an,
                    num_steps_autodiff=n_ad,
                    converged=ok_an and ok_ad,
                    time_analytic_s=t_an,
                    time_autodiff_s=t_ad,
                    time_ratio=t_ad / t_an,
                    time_per_step_ratio=(t_ad / n_ad) / (t_an / n_an),
                    compiled_mib_analytic=None if m_an is None else m_an / 2**20,
                    compiled_mib_autodiff=None if m_ad is None else m_ad / 2**20,
                    memory_ratio=None if (m_an is None or m_ad is None) else m_ad / m_an,
                    max_state_diff=float(jnp.max(jnp.abs(s_an - s_ad))),
                )
            )
    return rows


def run_implicit(args) -> list[dict]:
    if args.smoke:
        return implicit_ssm_iterations(
            T=20, dtypes=(jnp.dtype(args.dtype),), solvers=("QuasiDEER",)
        )
    return implicit_ssm_iterations(T=200 if args.quick else 1000, dtypes=(jnp.dtype(args.dtype),))


def plot(rows: list[dict], path) -> None:
    """Time and memory ratios (autodiff / analytic diagonal) against `D`, one line per `T`."""
    plt = pyplot()
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(9, 3.8))
    for T in sorted({r["T"] for r in rows}):
        mine = sorted((r for r in rows if r["T"] == T), key=lambda r: r["D"])
        Ds = [r["D"] for r in mine]
        ax_t.plot(Ds, [r["time_per_step_ratio"] for r in mine], "o-", label=f"T = {T}")
        if all(r["memory_ratio"] is not None for r in mine):
            ax_m.plot(Ds, [r["memory_ratio"] for r in mine], "s--", label=f"T = {T}")
    for ax, what in ((ax_t, "time per iteration"), (ax_m, "compiled memory")):
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.set(xscale="log", xlabel="D", ylabel=f"{what}: autodiff / analytic")
        ax.legend(fontsize="small")
    ax_t.set_title("QuasiDEER on cells.GRU: cost of a JVP diagonal")
    ax_m.set_title("above 1: the analytic diagonal saves")
    save_figure(fig, path)


def main(argv=None) -> list[dict]:
    p = study_parser((__doc__ or "").splitlines()[0], solvers=("QuasiDEER",))
    args = parse(p, argv, solver_names=("QuasiDEER",))
    with dtype_scope(args):
        rows = run(args)
        implicit = run_implicit(args)
    print(
        f"QuasiDEER on cells.GRU, {args.dtype}, {jax.devices()[0].platform}; "
        "ratios = autodiff / analytic"
    )
    print(format_table(rows))
    print("\nOuter iterations on cells.ImplicitSSM (default tolerances; max_steps = T)")
    print(format_table(implicit))
    write_csv(args.out / "bench_diagonal.csv", rows)
    write_csv(args.out / "implicit_ssm_iterations.csv", implicit)
    plot(rows, args.out / "bench_diagonal.png")
    print(
        f"wrote bench_diagonal.csv, implicit_ssm_iterations.csv, bench_diagonal.png in {args.out}"
    )
    return rows


if __name__ == "__main__":
    main()
