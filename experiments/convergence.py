"""Residual against iteration for every solver, on a stable, an unstable and a chaotic cell.

    python -m experiments.convergence [--quick] [--out results] [--dtype float64|float32]

Cases (inputs of size 4 for the GRUs, `T = 1000`; `--quick`: `T = 300`, `D = 8`):

- `gru`: a contractive `eqx.nn.GRUCell` (default initialisation);
- `gru_unstable`: the same cell with its recurrent weights `weight_hh` scaled up
  (`UNSTABLE_SCALE`), so that its linearisation is expanding and DEER struggles;
- `lorenz96`: one RK4 step (`dt = 0.01`) of the chaotic Lorenz96 system
  (`D = 5`, `F = 8`), the input added to the forcing.

Every solver runs with its defaults (no tuned damping) and `max_steps = T`. For
each case it writes `convergence_<case>.csv` (residual max-norm per iteration)
and `.png` (log scale), and prints a table of iterations to tolerance, whether it
converged, and the wall-clock time of the solve after compilation.
"""

import argparse

import equinox as eqx
import jax
import jax.numpy as jnp

import parallel_rnn as prnn

from ._common import format_table, parser, progress, pyplot, time_fn, write_csv


SOLVERS = ("DEER", "QuasiDEER", "ELK", "QuasiELK", "Picard", "Jacobi")
UNSTABLE_SCALE = 6.0


def make_case(name: str, T: int, hidden: int, dtype):
    """`(cell, inputs, init_state)` of one case."""
    kc, kx, ks = jax.random.split(jax.random.key(0), 3)
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
    raise ValueError(f"unknown case {name!r}")


def run_case(name, T, hidden, dtype, reps, bar):
    cell, xs, s0 = make_case(name, T, hidden, dtype)
    ref = prnn.solve_sequential(cell, xs, s0)
    rows, curves = [], {}
    for solver_name in SOLVERS:
        solver = getattr(prnn, solver_name)()
        solve = lambda: prnn.solve_parallel(cell, xs, s0, solver, throw=False, trace=True)
        sol = solve()
        seconds, _ = time_fn(solve, reps=reps)
        n = int(sol.num_steps)
        curves[solver_name] = [float(v) for v in sol.trace[:n]]
        finite = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(sol.states))
        err = float(
            max(
                jnp.max(jnp.abs(a - b))
                for a, b in zip(
                    jax.tree_util.tree_leaves(sol.states), jax.tree_util.tree_leaves(ref)
                )
            )
        )
        rows.append(
            dict(
                case=name,
                solver=solver_name,
                T=T,
                iterations=n,
                converged=bool(sol.converged),
                within_T=n <= T,
                finite=finite,
                max_err_vs_scan=err,
                seconds=seconds,
            )
        )
        bar.update(1)
    return rows, curves


def plot(path, name, curves, T):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for solver_name, ys in curves.items():
        ax.semilogy(range(1, len(ys) + 1), ys, label=solver_name)
    ax.set_xscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("max |r_t| (residual)")
    ax.set_title(f"{name} (T = {T})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    p.add_argument("--cases", nargs="+", default=["gru", "gru_unstable", "lorenz96"])
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.dtype(args.dtype)
    if args.smoke:  # seconds: the plumbing end to end, for the tests
        args.cases = ["gru"]
    T, hidden = (20, 4) if args.smoke else (300, 8) if args.quick else (1000, 16)
    reps = args.reps or (1 if args.quick or args.smoke else 3)

    all_rows = []
    with progress(range(len(args.cases) * len(SOLVERS)), desc="runs") as bar:
        for name in args.cases:
            rows, curves = run_case(name, T, hidden, dtype, reps, bar)
            all_rows += rows
            trace_rows = [
                dict(
                    iteration=i + 1, **{k: (v[i] if i < len(v) else "") for k, v in curves.items()}
                )
                for i in range(max(map(len, curves.values())))
            ]
            write_csv(args.out / f"convergence_{name}.csv", trace_rows)
            plot(args.out / f"convergence_{name}.png", name, curves, T)
    write_csv(args.out / "convergence_summary.csv", all_rows)
    print(f"dtype {args.dtype}, T = {T}, default tolerances, max_steps = T")
    print(
        format_table(
            all_rows,
            [
                "case",
                "solver",
                "iterations",
                "converged",
                "within_T",
                "finite",
                "max_err_vs_scan",
                "seconds",
            ],
        )
    )
    return all_rows


if __name__ == "__main__":
    main()
