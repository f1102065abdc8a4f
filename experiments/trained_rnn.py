"""Trained autoregressive RNNs (the ELK paper's Figure 4): every solver, a damping sweep.

    python -m experiments.trained_rnn [--quick] [--out results] [--T 9999] [--seed 0]

For each autoregressive case of `experiments/_trained.py` (`ar_gru3`, `ar_gru16`,
`ar_lstm`; `--quick`: `ar_gru3` only), the trained model is evaluated as a
recurrence over `T` steps (default 9999) from the zero guess, float32, default
tolerances and `max_steps = T`, with every solver at its defaults and with
`ELK(damping=λ)`, `QuasiELK(damping=λ)` for λ in `1e-9 … 1e2` (one per decade;
`--quick`: 1e-7, 1e-5, 1e-3, 1e-1). Along its trajectory the model is
marginally stable (LLE ≈ 0, printed), while its linearisation at the zero guess
is unstable. Then it trains the `ar_gru3` model twice from the same seed on the
same batches: BPTT (`solve_sequential`) and `solve_parallel(DEER)` with exact
(implicit adjoint) gradients, and compares the two loss curves.

To add solver configurations, append `(label, solver)` pairs to `EXTRA_SOLVERS`,
or call `run(solvers=[...])`, which returns the summary rows.

Outputs (in `--out`):

- `trained_rnn.csv`: one row per case and solver: `case`, `T`, `D`, `lle`,
  `solver`, `iterations`, `converged`, `residual` (final max-norm residual),
  `seconds` (one solve after ahead-of-time compilation), `compile_seconds`,
  `max_abs_err`, `mean_abs_err` (against `solve_sequential`, all state entries).
- `trained_rnn_residuals.csv`: `case`, `solver`, `iteration`, `residual` (from `trace=True`).
- `trained_rnn_errors.csv`: `case`, `solver`, `iteration`, `max_abs_err`,
  `mean_abs_err`: the error after `k` iterations, re-solved with `max_steps=k` on a
  log grid of `k` (default solvers and the best λ of each sweep; Figure 4).
- `trained_rnn_{case}.png`: residual and error vs iteration; iterations vs λ.
- `trained_rnn_training.csv` / `.png`: `step`, `loss_bptt`, `loss_parallel`.
"""

import argparse
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

import parallel_rnn as prnn

from ._common import format_table, number, parser, pyplot, write_csv
from ._measure import damping_sweep, default_solvers, error_curve, log_grid, measure
from ._trained import load_case, train_ar


CASES = ("ar_gru3", "ar_gru16", "ar_lstm")
LAMBDAS = tuple(10.0**k for k in range(-9, 3))
QUICK_LAMBDAS = (1e-7, 1e-5, 1e-3, 1e-1)
# (label, solver) pairs measured in every run besides the defaults and the sweep.
EXTRA_SOLVERS: list[tuple[str, prnn.AbstractSolver]] = []
CURVE_SOLVERS = ("DEER", "QuasiDEER", "ELK", "QuasiELK")
COLUMNS = ("case", "solver", "iterations", "converged", "seconds", "max_abs_err", "mean_abs_err")


def _best(rows, prefix):
    """The label of the fastest converged λ of a sweep (None for a sweep of < 2 values)."""
    swept = [r for r in rows if r["solver"].startswith(prefix)]
    converged = [r for r in swept if r["converged"]]
    if len(swept) < 2 or not converged:
        return None
    return min(converged, key=lambda r: r["iterations"])["solver"]


def run_case(
    name: str,
    T: int,
    *,
    quick: bool,
    seed: int,
    solvers: Sequence[tuple[str, prnn.AbstractSolver]],
    curves: Sequence[str] = CURVE_SOLVERS,
    curve_points: int | None = None,
    rtol=None,
    atol=None,
    steps: int | None = None,
    cache: Path | None = None,
):
    """Measure every solver on one trained case. Returns (rows, residual rows, error rows).
    `curve_points` thins each error curve to that many iteration counts (the first and
    last always among them; each point is one more compiled solve)."""
    kwargs = {} if cache is None else {"cache": cache}
    cell, xs, s0, meta = load_case(name, T=T, quick=quick, seed=seed, steps=steps, **kwargs)
    reference = prnn.solve_sequential(cell, xs, s0)
    lle = float(prnn.lyapunov_exponent(cell, xs, reference, s0, key=jax.random.key(0)))
    head = dict(case=name, T=T, D=meta["D"], lle=lle)
    rows, residual_rows, error_rows = [], [], []
    by_label = dict(solvers)
    for label, solver in solvers:
        row, trace = measure(cell, xs, s0, reference, label, solver, rtol=rtol, atol=atol)
        rows.append({**head, **row})
        residual_rows += [
            dict(case=name, solver=label, iteration=i + 1, residual=float(r))
            for i, r in enumerate(trace)
        ]
        print(f"  {name} {label}: {row['iterations']} iterations, error {row['max_abs_err']:.2g}")
    if curves:
        chosen = [n for n in curves if n in by_label]
        chosen += [b for b in (_best(rows, "ELK(damping"), _best(rows, "QuasiELK(damping")) if b]
        for label in chosen:
            last = next(r["iterations"] for r in rows if r["solver"] == label)
            ks = log_grid(last, per_decade=3 if quick else 6)
            if curve_points is not None and len(ks) > curve_points:
                picks = np.linspace(0, len(ks) - 1, max(curve_points, 2)).round().astype(int)
                ks = sorted({ks[i] for i in picks})
            for e in error_curve(
                cell, xs, s0, reference, by_label[label], ks, rtol=rtol, atol=atol
            ):
                error_rows.append(dict(case=name, solver=label, **e))
    return rows, residual_rows, error_rows


def compare_training(steps: int, seed: int, *, length=256, solver=None, rtol=None, atol=None):
    """Train `ar_gru3` by BPTT and through `solve_parallel` (same seed, same batches)."""

    def parallel_hidden(cell, inputs, h0):
        sol = prnn.solve_parallel(
            cell, inputs, h0, solver or prnn.DEER(), rtol=rtol, atol=atol, throw=False
        )
        return sol.states

    _, bptt = train_ar("gru", 3, seed, steps, length=length)
    _, par = train_ar("gru", 3, seed, steps, length=length, hidden_fn=parallel_hidden)
    return [dict(step=i, loss_bptt=a, loss_parallel=b) for i, (a, b) in enumerate(zip(bptt, par))]


def plot_case(path, name, rows, residual_rows, error_rows):
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    ax_r, ax_max, ax_mean, ax_lam = axes
    for label in dict.fromkeys(r["solver"] for r in residual_rows):
        if "damping=" in label:
            continue
        ys = [r["residual"] for r in residual_rows if r["solver"] == label]
        ax_r.loglog(range(1, len(ys) + 1), ys, label=label)
    for label in dict.fromkeys(r["solver"] for r in error_rows):
        pts = [r for r in error_rows if r["solver"] == label]
        ks = [p["iteration"] for p in pts]
        ax_max.loglog(ks, [p["max_abs_err"] for p in pts], "o-", ms=3, label=label)
        ax_mean.loglog(ks, [p["mean_abs_err"] for p in pts], "o-", ms=3, label=label)
    for prefix in ("ELK(damping=", "QuasiELK(damping="):
        pts = [r for r in rows if r["solver"].startswith(prefix)]
        lams = [float(r["solver"][len(prefix) : -1]) for r in pts]
        its = [r["iterations"] if r["converged"] else np.nan for r in pts]
        (line,) = ax_lam.loglog(lams, its, "o-", label=prefix[:-1] + "λ)")
        default = next((r for r in rows if r["solver"] == prefix.split("(")[0]), None)
        if default is not None:
            ax_lam.axhline(default["iterations"], color=line.get_color(), ls="--", lw=1)
    deer = next((r for r in rows if r["solver"] == "DEER"), None)
    if deer is not None:
        ax_lam.axhline(deer["iterations"], color="k", ls=":", lw=1, label="DEER")
    ax_r.set(xlabel="iteration", ylabel="max |r_t|", title=f"{name}: residual (trace)")
    ax_max.set(xlabel="iteration", ylabel="max |s_t - s_t*|", title="max-abs error vs sequential")
    ax_mean.set(xlabel="iteration", ylabel="mean |s_t - s_t*|", title="mean-abs error")
    ax_lam.set(xlabel="damping λ", ylabel="iterations", title="fixed λ (dashed: default)")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training(path, rows):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["loss_bptt"] for r in rows], label="BPTT (solve_sequential)")
    ax.plot([r["loss_parallel"] for r in rows], "--", label="solve_parallel (DEER, adjoint)")
    ax.set(xlabel="step", ylabel="Gaussian NLL", title="ar_gru3 training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(
    cases: Sequence[str] = ("ar_gru3",),
    T: int = 9999,
    *,
    quick: bool = True,
    seed: int = 0,
    solvers: Sequence[tuple[str, prnn.AbstractSolver]] | None = None,
    lambdas: Sequence[float] = QUICK_LAMBDAS,
    curves: Sequence[str] = CURVE_SOLVERS,
    curve_points: int | None = None,
    train_steps: int = 0,
    train_length: int = 256,
    rtol=None,
    atol=None,
    out: Path | None = Path("results"),
    steps: int | None = None,
    cache: Path | None = None,
) -> list[dict]:
    """Measure `solvers` (default: every default solver, the λ sweep and `EXTRA_SOLVERS`)
    on `cases`; write CSV and PNG into `out` (unless None); return the summary rows.
    Error curves are computed for the solvers labelled in `curves` (and the best λ of
    each sweep; `curves=()` skips them: each point is a re-solve; `curve_points` thins
    them). `train_steps > 0` also runs the BPTT vs `solve_parallel` training comparison."""
    if solvers is None:
        solvers = default_solvers() + damping_sweep(lambdas) + list(EXTRA_SOLVERS)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
    rows, residual_rows, error_rows = [], [], []
    for name in cases:
        r, res, err = run_case(
            name, T, quick=quick, seed=seed, solvers=solvers, curves=curves,
            curve_points=curve_points, rtol=rtol, atol=atol, steps=steps, cache=cache,
        )  # fmt: skip
        rows += r
        residual_rows += res
        error_rows += err
        if out is not None:
            plot_case(Path(out) / f"trained_rnn_{name}.png", name, r, res, err)
    if out is not None:
        write_csv(Path(out) / "trained_rnn.csv", rows)
        write_csv(Path(out) / "trained_rnn_residuals.csv", residual_rows)
        if error_rows:
            write_csv(Path(out) / "trained_rnn_errors.csv", error_rows)
    for name in cases:
        lle = next(r["lle"] for r in rows if r["case"] == name)
        print(f"\n{name}: T = {T}, LLE along the sequential trajectory {lle:.4f}")
        print(format_table([r for r in rows if r["case"] == name], COLUMNS))
    if train_steps:
        training = compare_training(train_steps, seed, length=train_length, rtol=rtol, atol=atol)
        gap = max(abs(r["loss_bptt"] - r["loss_parallel"]) for r in training)
        print(
            f"\ntraining ar_gru3, {train_steps} steps: max |loss_bptt - loss_parallel| = {gap:.3g}"
        )
        last = training[-1]
        print(f"final losses: BPTT {last['loss_bptt']:.5f}, parallel {last['loss_parallel']:.5f}")
        if out is not None:
            write_csv(Path(out) / "trained_rnn_training.csv", training)
            plot_training(Path(out) / "trained_rnn_training.png", training)
    return rows


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--T", type=number, default=None, help="sequence length (default 9999)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:  # seconds: the plumbing end to end, for the tests
        solvers = [("DEER", prnn.DEER()), *damping_sweep([1e-4])]
        return run(
            ("ar_gru3",), args.T or 60, quick=True, seed=args.seed, solvers=solvers,
            curves=("DEER",), curve_points=2, train_steps=3, train_length=32, out=args.out, steps=5,
            cache=Path(args.out) / "trained",
        )  # fmt: skip
    return run(
        CASES[:1] if args.quick else CASES,
        args.T or 9999,
        quick=args.quick,
        seed=args.seed,
        lambdas=QUICK_LAMBDAS if args.quick else LAMBDAS,
        curves=("DEER", "ELK") if args.quick else CURVE_SOLVERS,
        train_steps=50 if args.quick else 500,
        out=args.out,
    )


if __name__ == "__main__":
    main()
