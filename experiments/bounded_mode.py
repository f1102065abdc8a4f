"""The bounded mode against pure sequential evaluation, on the trained models.

    python -m experiments.bounded_mode [--quick] [--T 2048 16384] [--solvers ...]

For every long-memory model of `long_memory`'s quick list, the shipped trained AR
GRU and char-LSTM and the quickstart GRU, it times `solve_sequential` and, for each
solver, `solve_parallel(..., bounded=True)` (this backend's cost model) and
`bounded=c_gpu` (the GPU cost model of `parallel_rnn._cost`, to show where the
iterations would run on a GPU), after compilation, and records iterations, steps
finished sequentially, time relative to the sequential scan and max-abs error
against it. Pure parallel times on the same models are `long_memory`'s. Writes
`bounded_mode.csv`.
"""

import importlib
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import parallel_rnn as prnn
from parallel_rnn._cost import default_cost

from ._common import (
    by_mode,
    dtype_scope,
    format_table,
    parse,
    progress,
    solvers,
    study_parser,
    time_fn,
    write_csv,
)


SOLVERS = ("DEER", "QuasiDEER", "MultipleShooting")


def _flat(states) -> np.ndarray:
    leaves = jax.tree_util.tree_leaves(states)
    return np.concatenate([np.asarray(x).reshape(x.shape[0], -1) for x in leaves], axis=1)


def cases(args, T: int) -> dict:
    dtype = jnp.dtype(args.dtype)

    def gru():
        cell = eqx.nn.GRUCell(4, 16, key=jax.random.key(args.seed), dtype=dtype)
        xs = jax.random.normal(jax.random.key(args.seed + 1), (T, 4), dtype)
        return cell, xs, jnp.zeros(16, dtype)

    out = {"quickstart_gru": gru}
    if args.mode == "smoke":
        return out
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    trained = importlib.import_module("tests.trained")
    out["ar_gru3_shipped"] = lambda: trained.ar_gru3(dtype)  # its own T = 2000
    out["char_lstm_small"] = lambda: trained.char_lstm_small(dtype)  # T = 1000
    from ._long_memory import load_case
    from .long_memory import QUICK_MODELS

    for name, seed in QUICK_MODELS:
        out[f"{name}_s{seed}"] = lambda n=name, s=seed: load_case(n, T, seed=s, dtype=dtype)[:3]
    return out


def run(args) -> list[dict]:
    Ts = args.T or by_mode(args, smoke=[64], quick=[2048, 16384], full=[2048, 16384, 65536])
    reps = args.reps or by_mode(args, smoke=1, quick=3, full=5)
    solver_list = solvers(args)
    rows = []
    for T in Ts:
        case_list = cases(args, T)
        if T != Ts[0]:  # the shipped models have their own length: measure them once
            case_list = {
                k: v for k, v in case_list.items() if "shipped" not in k and "small" not in k
            }
        with progress(range(len(case_list)), desc=f"T={T}") as bar:
            for name, make in case_list.items():
                cell, xs, s0 = make()
                n = jax.tree_util.tree_leaves(xs)[0].shape[0]
                D = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(s0))
                seq = eqx.filter_jit(prnn.solve_sequential)
                ref = _flat(seq(cell, xs, s0))
                t_seq, _ = time_fn(lambda: seq(cell, xs, s0), reps=reps)
                rows.append(dict(case=name, T=n, D=D, solver="sequential", mode="", time_s=t_seq))
                for sname, solver in solver_list.items():
                    for mode, bounded in (
                        ("cpu model", True),
                        ("gpu model", default_cost(solver, n, D, "gpu")),
                    ):
                        solve = lambda: prnn.solve_parallel(
                            cell, xs, s0, solver, bounded=bounded, throw=False
                        )
                        sol = solve()
                        t, _ = time_fn(solve, reps=reps)
                        rows.append(
                            dict(
                                case=name,
                                T=n,
                                D=D,
                                solver=sname,
                                mode=mode,
                                num_steps=int(sol.num_steps),
                                sequential_steps=int(sol.sequential_steps),
                                converged=bool(sol.converged),
                                time_s=t,
                                time_vs_sequential=round(t / t_seq, 2),
                                max_abs_err=float(np.max(np.abs(_flat(sol.states) - ref))),
                            )
                        )
                bar.update(1)
    return rows


def main(argv=None) -> list[dict]:
    p = study_parser(__doc__, solvers=SOLVERS)
    args = parse(p, argv, solver_names=(*SOLVERS, "ELK", "QuasiELK", "Picard", "Jacobi"))
    with dtype_scope(args):
        rows = run(args)
    write_csv(args.out / "bounded_mode.csv", rows)
    columns = ["case", "T", "D", "solver", "mode", "num_steps", "sequential_steps"]
    print(format_table(rows, [*columns, "converged", "time_vs_sequential", "max_abs_err"]))
    print(f"wrote bounded_mode.csv into {args.out}")
    return rows


if __name__ == "__main__":
    main()
