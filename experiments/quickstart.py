"""Quick comparison: sequential evaluation vs every solver on an `eqx.nn.GRUCell`.

    python -m experiments.quickstart [--quick] [--T 10000] [--D 16] [--out results]

Prints, for each solver, the iterations, whether it converged or hit
`--max-steps`, the max abs error against `lax.scan`, and the wall-clock after
compilation relative to the sequential scan; writes `quickstart.csv` and
`quickstart.png` (residual against iteration, with the tolerance).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import parallel_rnn as prnn
from parallel_rnn._tolerance import default_tolerances

from ._common import (
    by_mode,
    dtype_scope,
    format_table,
    parse,
    plot_residuals,
    progress,
    pyplot,
    save_figure,
    solvers,
    study_parser,
    time_fn,
    write_csv,
)


EXPECTATION = {
    "cpu": (
        "On a CPU expect every parallel solver to be SLOWER than the sequential scan: "
        "each iteration repeats the scan's O(T) work and a CPU has no parallelism to "
        "spend on it; the speed-ups need a GPU, long sequences and small D "
        "(see docs/gpu.md)."
    ),
    "gpu": (
        "On a GPU the parallel solvers beat the sequential scan when T is long and "
        "D small (thousands of steps, D up to ~64 for the quasi solvers), and lose "
        "for short sequences, large D (DEER: O(D^3) per step) or many iterations."
    ),
}


def run(args) -> tuple[list[dict], dict]:
    T = (args.T or [by_mode(args, smoke=50, quick=1000, full=10_000)])[0]
    D = (args.D or [16])[0]
    reps = args.reps or by_mode(args, smoke=1, quick=3, full=5)
    dtype = jnp.dtype(args.dtype)
    key_cell, key_x = jax.random.split(jax.random.key(args.seed))
    cell = eqx.nn.GRUCell(4, D, key=key_cell, dtype=dtype)
    xs = jax.random.normal(key_x, (T, 4), dtype)
    h0 = jnp.zeros(D, dtype)
    max_steps = min(T, args.max_steps)

    sequential = eqx.filter_jit(prnn.solve_sequential)
    ref = sequential(cell, xs, h0)
    t_seq, _ = time_fn(lambda: sequential(cell, xs, h0), reps)
    common = dict(cell="eqx.nn.GRUCell", T=T, D=D, dtype=dtype.name, max_steps=max_steps)
    rows = [
        dict(
            common,
            solver="sequential",
            num_steps=T,
            converged=True,
            hit_max_steps=False,
            max_abs_err=0.0,
            time_ms=1e3 * t_seq,
            speedup=1.0,
        )
    ]
    traces = {}
    for name, solver in progress(solvers(args).items(), desc="solvers"):
        # The trace costs one scalar write per iteration: time the same compiled solve.
        solve = lambda: prnn.solve_parallel(
            cell, xs, h0, solver, max_steps=max_steps, throw=False, trace=True
        )
        sol = solve()
        t, _ = time_fn(solve, reps)
        traces[name] = np.asarray(sol.trace)[: int(sol.num_steps)]
        converged = bool(sol.converged)
        rows.append(
            dict(
                common,
                solver=name,
                num_steps=int(sol.num_steps),
                converged=converged,
                hit_max_steps=not converged and int(sol.num_steps) >= max_steps,
                max_abs_err=float(jnp.max(jnp.abs(sol.states - ref))),
                time_ms=1e3 * t,
                speedup=t_seq / t,
            )
        )
    rtol, atol = default_tolerances(dtype)
    tol = atol + rtol * float(jnp.max(jnp.abs(ref)))
    return rows, dict(traces=traces, tol=tol)


def tabulate(rows: list[dict]) -> str:
    def status(r):
        if r["solver"] == "sequential":
            return "reference"
        if r["converged"]:
            return "converged"
        return "hit max_steps" if r["hit_max_steps"] else "not converged"

    table = [
        {
            "solver": r["solver"],
            "iterations": r["num_steps"],
            "status": status(r),
            # A capped solve's error is that of an unfinished iterate, not of the method.
            "max_abs_err": r["max_abs_err"] if r["converged"] else f"({r['max_abs_err']:.2g})",
            "time_ms": r["time_ms"],
            "time_vs_sequential (x slower)": r["time_ms"] / rows[0]["time_ms"],
        }
        for r in rows
    ]
    return format_table(table)


def plot(rows: list[dict], extra: dict, path) -> None:
    plt = pyplot()
    r0 = rows[0]
    capped = [r["solver"] for r in rows if r["hit_max_steps"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plot_residuals(ax, extra["traces"], tol=extra["tol"], capped=capped)
    ax.set_title(f"eqx.nn.GRUCell, D={r0['D']}, T={r0['T']}, {r0['dtype']}")
    save_figure(fig, path)


def main(argv=None) -> list[dict]:
    p = study_parser(__doc__)
    p.add_argument(
        "--max-steps",
        type=int,
        default=300,
        help="iteration cap (Picard needs ~T iterations on a GRU: it shows as 'hit max_steps')",
    )
    args = parse(p, argv)
    with dtype_scope(args):
        rows, extra = run(args)
    backend = jax.default_backend()
    r0 = rows[0]
    print(f"\neqx.nn.GRUCell, D={r0['D']}, T={r0['T']}, {r0['dtype']}, backend={backend}")
    print(EXPECTATION["cpu" if backend == "cpu" else "gpu"])
    print(tabulate(rows))
    if any(r["hit_max_steps"] for r in rows):
        print(
            "Errors in brackets belong to solves stopped by --max-steps (not converged), "
            "not to the method."
        )
    write_csv(args.out / "quickstart.csv", rows)
    plot(rows, extra, args.out / "quickstart.png")
    print(f"wrote {args.out / 'quickstart.csv'} and {args.out / 'quickstart.png'}")
    return rows


if __name__ == "__main__":
    main()
