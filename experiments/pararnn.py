"""ParaRNN-style cells (diagonal recurrent weights): exact Newton at O(T·D) memory.

    python -m experiments.pararnn [--quick] [--D 16 64] [--T 100000]

Part 1, convergence and cost (float32, input size 4, random inputs, default
tolerances, zero initial guess): `DEER` and `QuasiDEER` on `cells.ParaGRU` and
`cells.ParaLSTM`, whose Jacobians are diagonal and `2×2`-block-diagonal and which
`DEER` solves exactly with diagonal / block scans, next to `DEER` on the dense
`cells.GRU`. Prints iterations, solve time (median after compilation) and the
compiled peak memory, also as a ratio to `T·D·4` bytes.

Part 2, training on the task of `experiments.train` (a leaky integral of noise,
MSE over every step, Adam, same data and schedule): `ParaGRU` trained with `DEER`
and with BPTT next to the dense `GRU` trained with `DEER`: loss curves, time per
step and forward iterations per step. Writes `pararnn_solve.csv`,
`pararnn_train.csv` and `pararnn_train.png`.
"""

import argparse

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import parallel_rnn as prnn

from ._common import compiled_memory, format_table, number, parser, pyplot, time_fn, write_csv
from .train import make_data, train


def _solve_rows(D: int, T: int, reps: int) -> list[dict]:
    f32 = jnp.float32
    key = jax.random.key(0)
    xs = jax.random.normal(jax.random.key(1), (T, 4), f32)
    h = jnp.zeros(D, f32)
    setups = [
        ("ParaGRU", prnn.cells.ParaGRU(4, D, key=key, dtype=f32), h, prnn.DEER()),
        ("ParaGRU", prnn.cells.ParaGRU(4, D, key=key, dtype=f32), h, prnn.QuasiDEER()),
        ("ParaLSTM", prnn.cells.ParaLSTM(4, D, key=key, dtype=f32), (h, h), prnn.DEER()),
        ("ParaLSTM", prnn.cells.ParaLSTM(4, D, key=key, dtype=f32), (h, h), prnn.QuasiDEER()),
        ("GRU (dense)", prnn.cells.GRU(4, D, key=key, dtype=f32), h, prnn.DEER()),
        ("GRU (dense)", prnn.cells.GRU(4, D, key=key, dtype=f32), h, prnn.QuasiDEER()),
    ]
    rows = []
    for name, cell, s0, solver in setups:
        solve = eqx.filter_jit(
            lambda c, x, s, solver=solver: prnn.solve_parallel(c, x, s, solver, throw=False)
        )
        sol = solve(cell, xs, s0)
        t, _ = time_fn(lambda: solve(cell, xs, s0), reps)
        mem = compiled_memory(prnn.solve_parallel, cell, xs, s0, solver, throw=False)
        D_flat = sum(leaf.size for leaf in jax.tree_util.tree_leaves(s0))
        rows.append(
            dict(
                cell=name,
                solver=type(solver).__name__,
                D=D,
                T=T,
                iterations=int(sol.num_steps),
                converged=bool(sol.converged),
                time_ms=1e3 * t,
                mem_MB=None if mem is None else mem / 1e6,
                mem_over_TD4=None if mem is None else mem / (T * D_flat * 4),
            )
        )
    return rows


class _Model(eqx.Module):
    cell: eqx.Module
    readout: eqx.nn.Linear


def main(argv=None) -> dict:
    p = parser(__doc__)
    p.add_argument("--D", nargs="+", type=number, default=None)
    p.add_argument("--T", type=number, default=None, help="length of the solves of part 1")
    p.add_argument("--train-T", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--hidden", type=int, default=8)
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.D, args.T, args.train_T, args.steps, args.reps = [2], 64, 32, 2, 1
    Ds = args.D or [16, 64]
    T = args.T or (10_000 if args.quick else 100_000)
    train_T = args.train_T or (512 if args.quick else 4096)
    steps = args.steps or (30 if args.quick else 300)
    reps = args.reps or (3 if args.quick else 5)

    solve_rows = [row for D in Ds for row in _solve_rows(D, T, reps)]
    print(f"\nPart 1: float32, backend={jax.default_backend()}")
    print(format_table(solve_rows))
    write_csv(args.out / "pararnn_solve.csv", solve_rows)

    f32, hidden = jnp.float32, args.hidden
    xs, ys = make_data(jax.random.key(1), 4, train_T, 0.9, f32)
    kc, kr = jax.random.split(jax.random.key(0))
    readout = eqx.nn.Linear(hidden, 1, key=kr, dtype=f32)
    h0 = jnp.zeros(hidden, f32)
    runs = {
        "GRU (dense), DEER": (prnn.cells.GRU(1, hidden, key=kc, dtype=f32), "DEER"),
        "ParaGRU, DEER": (prnn.cells.ParaGRU(1, hidden, key=kc, dtype=f32), "DEER"),
        "ParaGRU, BPTT": (prnn.cells.ParaGRU(1, hidden, key=kc, dtype=f32), "BPTT"),
    }
    curves, summary = {}, []
    for label, (cell, method) in runs.items():
        rows = train(method, _Model(cell, readout), xs, ys, h0, steps, 1e-2)
        curves[label] = rows
        times = np.array([r["step_time_s"] for r in rows])
        iters = [r["iterations"] for r in rows if r["iterations"] != ""]
        summary.append(
            dict(
                run=label,
                first_loss=rows[0]["loss"],
                final_loss=rows[-1]["loss"],
                step_ms_median=1e3 * float(np.median(times[1:])) if len(times) > 1 else "",
                iters_mean=float(np.mean(iters)) if iters else "",
                iters_max=int(np.max(iters)) if iters else "",
                not_converged=sum(not r["converged"] for r in rows),
            )
        )
    print(f"\nPart 2: hidden={hidden}, T={train_T}, batch=4, steps={steps}, float32")
    print(format_table(summary))
    write_csv(
        args.out / "pararnn_train.csv",
        [dict(run=k, **r) for k, rows in curves.items() for r in rows],
    )

    plt = pyplot()
    fig, (ax_loss, ax_iter) = plt.subplots(1, 2, figsize=(10, 4))
    for label, rows in curves.items():
        step = [r["step"] for r in rows]
        ax_loss.semilogy(step, [r["loss"] for r in rows], label=label, lw=2)
        if rows[0]["iterations"] != "":
            ax_iter.plot(step, [r["iterations"] for r in rows], label=label, lw=2)
    ax_loss.set_xlabel("Adam step")
    ax_loss.set_ylabel("training MSE")
    ax_loss.legend()
    ax_iter.set_xlabel("Adam step")
    ax_iter.set_ylabel("DEER iterations (max over batch, warm start)")
    ax_iter.legend()
    fig.tight_layout()
    fig.savefig(args.out / "pararnn_train.png", dpi=120)
    return dict(solve=solve_rows, train=summary)


if __name__ == "__main__":
    main()
