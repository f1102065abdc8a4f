"""Predicted against measured iterations: how good is `prnn.diagnose`?

    python -m experiments.predict_cost [--quick] [--out results] [--prefix 256]

For every case (the cells of `convergence`, the shipped trained AR GRU and char
LSTM, the trained models of `trained_rnn`/`trained_lm` in full mode, and the
long-memory models of `long_memory` when that module is present), it runs
`prnn.diagnose` on the case, then every solver at the full length (`max_steps = T`,
no polish), and records predicted and measured iterations. It prints the table,
the Spearman rank correlation over all (case, solver) pairs, and each case's
recommended solver against the one that measured cheapest, and writes
`predict_cost.csv` and a log-log scatter plot `predict_cost.png`.
"""

import importlib

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
    pyplot,
    save_figure,
    solvers,
    study_parser,
    style,
    write_csv,
)
from .convergence import make_case


SOLVERS = ("DEER", "QuasiDEER", "ELK", "QuasiELK", "MultipleShooting")


def cases(args) -> dict:
    """name -> `() -> (cell, inputs, init_state)`, in `args.dtype`."""
    import sys
    from pathlib import Path

    dtype = jnp.dtype(args.dtype)
    T = by_mode(args, smoke=40, quick=300, full=1000)
    out = {
        name: (lambda name=name: make_case(name, T, 8, dtype, args.seed))
        for name in ("gru", "gru_unstable", "lorenz96")
    }
    if args.mode == "smoke":
        return {"gru": out["gru"]}
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    trained = importlib.import_module("tests.trained")
    out["ar_gru3"] = lambda: trained.ar_gru3(dtype)
    out["char_lstm_small"] = lambda: trained.char_lstm_small(dtype)
    try:
        long_memory = importlib.import_module("experiments._long_memory")
    except ImportError:
        long_memory = None
    if long_memory is not None and hasattr(long_memory, "prediction_cases"):
        out.update(long_memory.prediction_cases(args))
    if args.mode == "full":
        from ._trained import load_case

        for name in ("ar_gru16", "char_lstm"):
            out[name] = lambda name=name: load_case(name, quick=True, seed=args.seed)[:3]
    return out


def spearman(a, b) -> float:
    """Rank correlation (average ranks for ties), without SciPy."""

    def ranks(x):
        x = np.asarray(x, float)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):  # ties share their mean rank
            r[x == v] = r[x == v].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def run(args) -> list[dict]:
    solver_list = solvers(args)
    prefix = args.prefix or by_mode(args, smoke=16, quick=128, full=256)
    rows = []
    case_list = cases(args)
    with progress(range(len(case_list)), desc="cases") as bar:
        for name, make in case_list.items():
            cell, xs, s0 = make()
            T = jax.tree_util.tree_leaves(xs)[0].shape[0]
            D = sum(int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(s0))
            d = prnn.diagnose(cell, xs, s0, solvers=solver_list, prefix=prefix)
            measured = {}
            for sname, solver in solver_list.items():
                sol = prnn.solve_parallel(cell, xs, s0, solver, throw=False, polish=False)
                measured[sname] = int(sol.num_steps)
                p = d.predictions[sname]
                rows.append(
                    dict(
                        case=name,
                        solver=sname,
                        T=T,
                        D=D,
                        lle=d.lyapunov_exponent,
                        prefix=d.prefix,
                        prefix_iterations=f"{p.prefix_iterations[0]}/{p.prefix_iterations[1]}",
                        growth=round(p.growth, 3),
                        predicted=p.iterations,
                        num_steps=measured[sname],
                        converged=bool(sol.converged),
                        recommended=d.recommendation,
                    )
                )
            cost = {s: (measured[s] + 1) * default_cost(solver_list[s], T, D) for s in measured}
            best = min(cost, key=lambda s: cost[s])
            for r in rows[-len(solver_list) :]:
                r["cheapest_measured"] = best if cost[best] < T else "sequential"
            bar.update(1)
    return rows


def plot(rows: list[dict], path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    for sname in dict.fromkeys(r["solver"] for r in rows):
        mine = [r for r in rows if r["solver"] == sname]
        st = style(sname)
        ax.scatter(
            [max(r["num_steps"], 1) for r in mine],
            [max(r["predicted"], 1) for r in mine],
            label=sname,
            color=st.get("color"),
            marker=st.get("marker", "o"),
        )
    hi = max(max(r["num_steps"], r["predicted"], 1) for r in rows) * 1.5
    ax.plot([1, hi], [1, hi], "k:", lw=1)
    ax.set(xscale="log", yscale="log", xlabel="measured iterations", ylabel="predicted")
    ax.set_title(f"diagnose: rank correlation {spearman(*_pairs(rows)):.2f}")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def _pairs(rows):
    return [r["predicted"] for r in rows], [r["num_steps"] for r in rows]


def main(argv=None) -> list[dict]:
    p = study_parser(__doc__, solvers=SOLVERS)
    p.add_argument("--prefix", type=int, default=None, help="longest prefix diagnose solves")
    args = parse(p, argv, solver_names=(*SOLVERS, "Picard", "Jacobi", "BlockQuasiDEER"))
    with dtype_scope(args):
        rows = run(args)
    write_csv(args.out / "predict_cost.csv", rows)
    plot(rows, args.out / "predict_cost.png")
    columns = ["case", "solver", "T", "lle", "prefix_iterations", "predicted", "num_steps"]
    print(format_table(rows, [*columns, "recommended", "cheapest_measured"]))
    rho = spearman(*_pairs(rows))
    print(f"Spearman rank correlation, predicted vs measured iterations: {rho:.3f}")
    print(f"wrote predict_cost.csv and .png into {args.out}")
    return rows


if __name__ == "__main__":
    main()
