"""Residual against iteration for every solver, on a stable, an unstable and a chaotic cell.

    python -m experiments.convergence [--quick] [--out results] [--dtype float32] [--cases ...]
        [--extra "ELK(damping=1e-3, adaptive=False)" ...]

Cases (inputs of size 4 for the GRUs, `T = 1000`; `--quick`: `T = 300`, `D = 8`):

- `gru`: a contractive `eqx.nn.GRUCell` (default initialisation);
- `gru_unstable`: the same cell with its recurrent weights `weight_hh` scaled up
  (`UNSTABLE_SCALE`), so that its linearisation is expanding and DEER struggles;
- `lorenz96`: one RK4 step (`dt = 0.01`) of the chaotic Lorenz96 system
  (`D = 5`, `F = 8`), the input added to the forcing.

Every solver runs with its defaults (no tuned damping) and `max_steps = T`. For
each case it writes `convergence_<case>.csv` (residual max-norm per iteration)
and `.png` (log scale: non-finite and zero residuals are left out, the
tolerance is drawn, solvers that hit `max_steps` are labelled), and prints a
table of iterations, whether each solve converged or hit `max_steps`, its error
against `lax.scan`, and the wall-clock time of the solve after compilation.
`--extra` adds solver expressions evaluated with `parallel_rnn`'s names in scope
(e.g. a fixed-damping sweep, or `DEER(globalise=False)`), labelled by the expression.
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
    parse_solver,
    plot_residuals,
    progress,
    pyplot,
    save_figure,
    solvers,
    study_parser,
    time_fn,
    write_csv,
)


CASES = ("gru", "gru_unstable", "lorenz96")
UNSTABLE_SCALE = 6.0


def make_case(name: str, T: int, hidden: int, dtype, seed: int = 0):
    """`(cell, inputs, init_state)` of one case."""
    kc, kx, ks = jax.random.split(jax.random.key(seed), 3)
    if name in ("gru", "gru_unstable"):
        cell = eqx.nn.GRUCell(4, hidden, key=kc, dtype=dtype)
        if name == "gru_unstable":
            cell = eqx.tree_at(lambda c: c.weight_hh, cell, UNSTABLE_SCALE * cell.weight_hh)
        xs = jax.random.normal(kx, (T, 4), dtype)
        return cell, xs, jnp.zeros(hidden, dtype)
    if name == "lorenz96":
        D = 5
        cell = prnn.cells.Lorenz96(D, 8.0, 0.01)
        xs = 0.1 * jax.random.normal(kx, (T, D), dtype)
        s0 = 8.0 + jax.random.normal(ks, (D,), dtype)
        return cell, xs, s0
    raise ValueError(f"unknown case {name!r}; choose from {CASES}")


def run_case(name, T, hidden, dtype, reps, seed, solver_list, bar):
    """Summary rows and residual traces of every solver on one case."""
    cell, xs, s0 = make_case(name, T, hidden, dtype, seed)
    ref = prnn.solve_sequential(cell, xs, s0)
    rtol, atol = default_tolerances(dtype)
    rows, traces = [], {}
    for solver_name, solver in solver_list.items():
        solve = lambda: prnn.solve_parallel(cell, xs, s0, solver, throw=False, trace=True)
        sol = solve()
        seconds, _ = time_fn(solve, reps=reps)
        n = int(sol.num_steps)
        traces[solver_name] = np.asarray(sol.trace[:n])
        converged = bool(sol.converged)
        rows.append(
            dict(
                case=name,
                solver=solver_name,
                T=T,
                D=int(s0.shape[0]),
                dtype=jnp.dtype(dtype).name,
                num_steps=n,
                converged=converged,
                hit_max_steps=not converged and n >= T,
                max_abs_err=float(jnp.max(jnp.abs(sol.states - ref))),
                time_s=seconds,
                tol=atol + rtol * float(jnp.max(jnp.abs(ref))),
            )
        )
        bar.update(1)
    return rows, traces


def run(args) -> tuple[list[dict], dict]:
    cases = ["gru"] if args.smoke else args.cases
    T = (args.T or [by_mode(args, smoke=20, quick=300, full=1000)])[0]
    hidden = (args.D or [by_mode(args, smoke=4, quick=8, full=16)])[0]
    reps = args.reps or by_mode(args, smoke=1, quick=1, full=3)
    dtype = jnp.dtype(args.dtype)
    solver_list = solvers(args) | dict(parse_solver(e) for e in args.extra)
    rows, traces = [], {}
    with progress(range(len(cases) * len(solver_list)), desc="runs") as bar:
        for name in cases:
            case_rows, traces[name] = run_case(
                name, T, hidden, dtype, reps, args.seed, solver_list, bar
            )
            rows += case_rows
    return rows, traces


def trace_rows(traces: dict) -> list[dict]:
    """One row per iteration, one column per solver (empty after it stopped)."""
    n = max(map(len, traces.values()))
    return [
        dict(iteration=i + 1, **{k: (float(v[i]) if i < len(v) else "") for k, v in traces.items()})
        for i in range(n)
    ]


def tabulate(rows: list[dict]) -> str:
    columns = ["case", "solver", "num_steps", "converged", "hit_max_steps", "max_abs_err"]
    return format_table(rows, [*columns, "time_s"])


def plot(rows: list[dict], case: str, traces: dict, path) -> None:
    mine = [r for r in rows if r["case"] == case]
    capped = [r["solver"] for r in mine if r["hit_max_steps"]]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plot_residuals(ax, traces, tol=max(r["tol"] for r in mine), capped=capped)
    ax.set_title(f"{case} (T = {mine[0]['T']}, {mine[0]['dtype']}, max_steps = T)")
    save_figure(fig, path)


def main(argv=None) -> list[dict]:
    p = study_parser(__doc__, dtype="float64")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument(
        "--extra", nargs="+", default=[], help='solver expressions, e.g. "DEER(globalise=False)"'
    )
    args = parse(p, argv)
    with dtype_scope(args):
        rows, traces = run(args)
    for case, case_traces in traces.items():
        write_csv(args.out / f"convergence_{case}.csv", trace_rows(case_traces))
        plot(rows, case, case_traces, args.out / f"convergence_{case}.png")
    write_csv(args.out / "convergence_summary.csv", rows)
    r0 = rows[0]
    print(f"{r0['dtype']}, T = {r0['T']}, default tolerances, max_steps = T")
    print(tabulate(rows))
    print(f"wrote convergence_*.csv and .png into {args.out}")
    return rows


if __name__ == "__main__":
    main()
