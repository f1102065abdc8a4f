"""Per-iteration cost of every solver against its floors: one batched cell evaluation
and one linear-recurrence pass.

    python -m experiments.bench_solvers [--quick] [--cells gru lstm eqx eqx-lstm]
        [--D 4 16 64] [--T 10000 100000]

`--cells eqx` (`eqx-lstm`) runs `eqx.nn.GRUCell` (`eqx.nn.LSTMCell`) unwrapped.

For each cell, D and T (float32) it prints, measured in one run: the time of one
batched cell evaluation over all T steps (`jax.vmap`), of one linear-recurrence
pass alone (dense for the dense solvers, diagonal for the others: `scan_ms`), of
the sequential scan, and for each solver the total solve time, iterations, the
marginal time per iteration ((t(9) - t(1)) / 8 at zero tolerance), the ratios
per-iteration / batched evaluation, per-iteration / linear scan and
total / sequential, and the peak memory of the compiled solve as a ratio to
T·D·4 bytes (quasi solvers) or T·D²·4 bytes (dense solvers).
"""

import argparse

import equinox as eqx
import jax
import jax.numpy as jnp

import parallel_rnn as prnn

from ._common import (
    SOLVER_NAMES,
    available_solvers,
    compiled_memory,
    format_table,
    number,
    parser,
    progress,
    pyplot,
    save_figure,
    time_fn,
    write_csv,
)


EXTRA = 8  # iterations added to measure the marginal time of one

# Picard needs ~T iterations on these cells (see the convergence study).
SOLVERS = tuple(n for n in SOLVER_NAMES if n != "Picard")


def make_cell(kind: str, D: int, key):
    cells, f32 = prnn.cells, jnp.float32
    if kind == "gru":
        cls = getattr(cells, "GRU", eqx.nn.GRUCell)
        return cls(4, D, key=key, dtype=f32)
    if kind == "lstm":
        cls = getattr(cells, "LSTM", eqx.nn.LSTMCell)
        return cls(4, D, key=key, dtype=f32)
    # Equinox's own cells as the README passes them (closed forms by registration).
    if kind == "eqx":
        return eqx.nn.GRUCell(4, D, key=key, dtype=f32)
    if kind == "eqx-lstm":
        return eqx.nn.LSTMCell(4, D, key=key, dtype=f32)
    raise ValueError(f"unknown cell {kind!r}")


def init_state(kind: str, D: int):
    h = jnp.zeros(D, jnp.float32)
    return (h, h) if kind in ("lstm", "eqx-lstm") else h


def linear_scan_times(T: int, D: int, reps: int, max_dense_bytes: float) -> dict:
    """Seconds of one linear-recurrence pass alone, dense `(T, D, D)` and diagonal `(T, D)`.

    The scan method is the library's automatic choice for this backend (the same one
    the solvers use), so these are the per-iteration floors besides the cell.
    """
    from parallel_rnn._scan import dense_recurrence, diagonal_recurrence

    key_a, key_b = jax.random.split(jax.random.key(2))
    b = jax.random.normal(key_b, (T, D), jnp.float32)
    a = 0.9 * jax.random.uniform(key_a, (T, D), jnp.float32)
    t_diag, _ = time_fn(lambda: jax.jit(diagonal_recurrence)(a, b), reps)
    t_dense = None
    if T * D * D * 4 <= max_dense_bytes:
        A = jax.random.normal(key_a, (T, D, D), jnp.float32) / (2 * D**0.5)
        t_dense, _ = time_fn(lambda: jax.jit(dense_recurrence)(A, b), reps)
    return {"diagonal": t_diag, "dense": t_dense}


def bench_one(kind, D, T, reps, max_dense_bytes, solvers=SOLVERS, tol=None):
    cell = make_cell(kind, D, jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (T, 4), jnp.float32)
    s0 = init_state(kind, D)
    D_flat = 2 * D if kind in ("lstm", "eqx-lstm") else D
    traj = prnn.solve_sequential(cell, xs, s0)
    prev = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a[None], b[:-1]]), s0, traj)

    batched = eqx.filter_jit(lambda c, x, p: jax.vmap(c)(x, p))
    t_eval, _ = time_fn(lambda: batched(cell, xs, prev), reps)
    seq = eqx.filter_jit(prnn.solve_sequential)
    t_seq, _ = time_fn(lambda: seq(cell, xs, s0), reps)
    t_scan = linear_scan_times(T, D_flat, reps, max_dense_bytes)
    rows = []
    for name, solver in available_solvers(solvers).items():
        dense = solver.jacobian == "dense"
        t_lin = t_scan["dense" if dense else "diagonal"]
        row = dict(
            cell=kind,
            D=D,
            T=T,
            solver=name,
            eval_ms=1e3 * t_eval,
            seq_ms=1e3 * t_seq,
            scan_ms=None if t_lin is None else 1e3 * t_lin,
        )
        unit = T * D_flat * (D_flat if dense else 1) * 4
        if dense and unit > max_dense_bytes:
            rows.append(dict(row, status="skipped (dense arrays too large)"))
            continue
        run = lambda n, tol=None: prnn.solve_parallel(
            cell, xs, s0, solver, max_steps=n, rtol=tol, atol=tol, throw=False
        )
        sol = run(T, tol)
        n = int(sol.num_steps)
        t_total, spread = time_fn(lambda: run(T, tol), reps)
        # Marginal cost of an iteration: with a zero tolerance the loop never stops
        # early, so 1 and 1 + EXTRA iterations differ by exactly EXTRA iterations.
        t_one, _ = time_fn(lambda: run(1, 0.0), reps)
        t_more, _ = time_fn(lambda: run(1 + EXTRA, 0.0), reps)
        per_iter = (t_more - t_one) / EXTRA
        mem = compiled_memory(prnn.solve_parallel, cell, xs, s0, solver, throw=False)
        rows.append(
            dict(
                row,
                status="ok" if bool(sol.converged) else "not converged",
                iterations=n,
                total_ms=1e3 * t_total,
                spread_ms=1e3 * spread,
                per_iter_ms=1e3 * per_iter,
                per_iter_over_eval=per_iter / t_eval,
                per_iter_over_scan=None if t_lin is None else per_iter / t_lin,
                total_over_seq=t_total / t_seq,
                mem_MB=None if mem is None else mem / 1e6,
                mem_over_unit=None if mem is None else mem / unit,
                unit="T*D^2*4" if dense else "T*D*4",
            )
        )
    return rows


def main(argv=None) -> list[dict]:
    p = parser(__doc__)
    p.add_argument("--cells", nargs="+", default=["gru", "lstm"])
    p.add_argument("--D", nargs="+", type=number, default=None)
    p.add_argument("--T", nargs="+", type=number, default=None)
    p.add_argument("--max-dense-gb", type=float, default=2.0)
    p.add_argument("--solvers", nargs="+", default=list(SOLVERS))
    p.add_argument(
        "--tol",
        type=float,
        default=None,
        help="rtol = atol of the solves (default: the library's, 32·eps ≈ 3.8e-6 in float32); "
        "the published codes' figures quoted in issue 7 used 1e-4",
    )
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.cells, args.D, args.T, args.reps = ["gru"], [2], [64], 1
        args.solvers = ["QuasiDEER"]  # each solver is four compiles: one is enough here
    Ds = args.D or ([4, 16] if args.quick else [4, 16, 64])
    Ts = args.T or ([10_000] if args.quick else [10_000, 100_000])
    reps = args.reps or (3 if args.quick else 5)
    grid = [(c, D, T) for c in args.cells for D in Ds for T in Ts]
    rows = []
    for kind, D, T in progress(grid, desc="configurations"):
        rows += bench_one(kind, D, T, reps, args.max_dense_gb * 1e9, args.solvers, args.tol)
    cols = [
        "cell",
        "D",
        "T",
        "solver",
        "status",
        "iterations",
        "total_ms",
        "per_iter_ms",
        "eval_ms",
        "per_iter_over_eval",
        "scan_ms",
        "per_iter_over_scan",
        "seq_ms",
        "total_over_seq",
        "mem_MB",
        "mem_over_unit",
        "unit",
    ]
    tol = "library default" if args.tol is None else args.tol
    print(f"\nfloat32, backend={jax.default_backend()}, tolerance: {tol}")
    print(format_table(rows, cols))
    write_csv(args.out / "bench_solvers.csv", [{c: r.get(c, "") for c in cols} for r in rows])
    plot(rows, args.out / "bench_solvers.png")
    return rows


def plot(rows: list[dict], path) -> None:
    """Per-iteration time over one batched evaluation, per configuration and solver."""
    plt = pyplot()
    done = [r for r in rows if "per_iter_over_eval" in r]
    configs = sorted({(r["cell"], r["D"], r["T"]) for r in done})
    solvers = sorted({r["solver"] for r in done})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(configs)), 4))
    width = 0.8 / max(1, len(solvers))
    for k, name in enumerate(solvers):
        ys = [
            next(
                (
                    r["per_iter_over_eval"]
                    for r in done
                    if (r["cell"], r["D"], r["T"]) == c and r["solver"] == name
                ),
                float("nan"),
            )
            for c in configs
        ]
        ax.bar([i + k * width for i in range(len(configs))], ys, width, label=name)
    ax.axhline(2.0, color="k", ls="--", lw=1, label="target (2x)")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(configs))])
    ax.set_xticklabels([f"{c} D={d}\nT={t}" for c, d, t in configs], fontsize=8)
    ax.set_ylabel("time per iteration / batched cell evaluation")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
