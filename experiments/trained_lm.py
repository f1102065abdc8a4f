"""Trained character-level language models from a cold start: every solver.

    python -m experiments.trained_lm [--quick] [--out results] [--T 2000 10000] [--seed 0]
        [--solvers DEER QuasiDEER ...] [--extra "ELK(damping=1e-6)" ...]
        [--rtol R] [--atol A] [--max-steps N]

The `char_lstm` (LSTM, 64 hidden units, state `(h, c)`, `D = 128`) and `char_gru`
(GRU, 128 hidden units) language models of `experiments/_trained.py`, trained with
Adam on ~60k characters of standard-library docstrings, are run teacher-forced over
`T` held-out characters (inputs: the characters' embeddings) from a zero state and
the zero guess, float32, with every solver at its defaults (tolerances and
`max_steps = T` unless given). `T ∈ {2000, 10000}`; `--quick`: quickly trained
weights, `T = 2000`, and dense `ELK` left out (a dense Kalman filter at `D = 128`
takes 2–3 minutes per solve at `T = 2000` on a 2-core CPU, about 150 iterations of
0.4–0.5 ms per time step; name it in `--solvers` to run it).

`--extra` takes solver expressions evaluated with `parallel_rnn`'s names in scope
(`"DEER()"`, `"QuasiELK(damping=0.1)"`). From Python, `run(solvers=[(label,
solver), ...], rtol=..., atol=...)` returns the summary rows.

Outputs (in `--out`):

- `trained_lm.csv`: `case`, `T`, `D`, `lle` (largest Lyapunov exponent along the
  sequential trajectory), `held_out_loss` (nats/char, first 2000 held-out
  characters), `solver`, `iterations`, `converged`, `residual` (final max-norm),
  `seconds` (one solve after ahead-of-time compilation), `compile_seconds`,
  `max_abs_err`, `mean_abs_err` (against `solve_sequential`, all state entries).
- `trained_lm_residuals.csv`: `case`, `T`, `solver`, `iteration`, `residual`.
- `trained_lm_{case}_T{T}.png`: residual vs iteration, one line per solver.
"""

import argparse
from collections.abc import Sequence
from pathlib import Path

import jax

import parallel_rnn as prnn

from ._common import format_table, number, parse_solver, parser, pyplot, write_csv
from ._measure import default_solvers, measure
from ._trained import CACHE, load_case


CASES = ("char_lstm", "char_gru")
QUICK_SKIP = ("ELK",)
COLUMNS = ("case", "T", "solver", "iterations", "converged", "seconds", "max_abs_err")


def plot(path, title, residual_rows):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label in dict.fromkeys(r["solver"] for r in residual_rows):
        ys = [r["residual"] for r in residual_rows if r["solver"] == label]
        ax.loglog(range(1, len(ys) + 1), ys, label=label)
    ax.set(xlabel="iteration", ylabel="max |r_t| (residual)", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(
    cases: Sequence[str] = CASES,
    Ts: Sequence[int] = (2000,),
    *,
    quick: bool = True,
    seed: int = 0,
    solvers: Sequence[tuple[str, prnn.AbstractSolver]] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int | None = None,
    out: Path | None = Path("results"),
    steps: int | None = None,
    cache: Path | None = None,
) -> list[dict]:
    """Measure `solvers` (default: every solver at its defaults) on each case and `T`;
    write CSV and PNG into `out` (unless None); return the summary rows."""
    if solvers is None:
        solvers = default_solvers()
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
    rows, residual_rows = [], []
    for name in cases:
        for T in Ts:
            cell, xs, s0, meta = load_case(
                name,
                T=T,
                quick=quick,
                seed=seed,
                steps=steps,
                cache=CACHE if cache is None else cache,
            )
            reference = prnn.solve_sequential(cell, xs, s0)
            lle = prnn.lyapunov_exponent(cell, xs, reference, s0, key=jax.random.key(0))
            head = dict(
                case=name, T=T, D=meta["D"], lle=float(lle), held_out_loss=meta["held_out_loss"]
            )
            these = []
            for label, solver in solvers:
                cap = None if max_steps is None else min(max_steps, T)
                row, trace = measure(
                    cell, xs, s0, reference, label, solver, rtol=rtol, atol=atol, max_steps=cap
                )
                rows.append({**head, **row})
                print(f"  {name} T={T} {label}: {row['iterations']} iterations")
                these += [
                    dict(case=name, T=T, solver=label, iteration=i + 1, residual=float(r))
                    for i, r in enumerate(trace)
                ]
            residual_rows += these
            if out is not None:
                plot(Path(out) / f"trained_lm_{name}_T{T}.png", f"{name}, T = {T}", these)
    if out is not None:
        write_csv(Path(out) / "trained_lm.csv", rows)
        write_csv(Path(out) / "trained_lm_residuals.csv", residual_rows)
    for name in cases:
        for T in Ts:
            r0 = next(r for r in rows if r["case"] == name and r["T"] == T)
            print(
                f"\n{name}, T = {T}: D = {r0['D']}, LLE {r0['lle']:.4f},"
                f" held-out loss {r0['held_out_loss']:.3f} nats/char"
            )
            print(format_table([r for r in rows if r["case"] == name and r["T"] == T], COLUMNS))
    return rows


def main(argv=None):
    p = parser((__doc__ or "").splitlines()[0])
    p.add_argument("--T", type=number, nargs="+", default=None, help="lengths (default 2000 10000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--solvers", nargs="+", default=None, help="default solvers by class name")
    p.add_argument("--extra", nargs="+", default=[], help='solver expressions, e.g. "DEER()"')
    p.add_argument("--rtol", type=float, default=None)
    p.add_argument("--atol", type=float, default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    defaults = dict(default_solvers())
    names = args.solvers
    if names is None and args.smoke:
        names = ["QuasiDEER", "Jacobi"]
    if names is None:
        names = [n for n in defaults if not args.quick or n not in QUICK_SKIP]
    unknown = [n for n in names if n not in defaults]
    if unknown:
        raise ValueError(f"unknown solvers {unknown}; choose from {list(defaults)}")
    solvers = [(n, defaults[n]) for n in names] + [parse_solver(e) for e in args.extra]
    common = dict(
        seed=args.seed, solvers=solvers, rtol=args.rtol, atol=args.atol,
        max_steps=args.max_steps, out=args.out,
    )  # fmt: skip
    if args.smoke:  # seconds: the plumbing end to end, for the tests
        return run(
            ["char_lstm_small"], args.T or [50], quick=True, steps=3,
            cache=Path(args.out) / "trained", **common,
        )  # fmt: skip
    Ts = args.T or ([2000] if args.quick else [2000, 10_000])
    return run(args.cases, Ts, quick=args.quick, **common)


if __name__ == "__main__":
    main()
