"""DEER iterations vs sequence length, coloured by the largest Lyapunov exponent.

    python -m experiments.predictability --quick      # CPU, about a minute
    python -m experiments.predictability              # the paper's sizes; a GPU helps

Fig 2 of Gonzalez et al., *Predictability enables parallelization of nonlinear
state space models* (NeurIPS 2025). The mean-field tanh RNN

    s_t = W tanh(s_{t-1}) + u_t,   W_ij ~ N(0, g²/D) (i ≠ j), W_ii = 0,

with small random inputs `u_t`, is stable for small gains `g` and chaotic for
large ones (the transition is near `g = 1`). For every gain and seed we estimate
the largest Lyapunov exponent (LLE) with `parallel_rnn.lyapunov_exponent` on the
sequential trajectory, and count DEER's iterations to converge (float64, the
library's default tolerance 1e-10) at each length `T` (separate solves on the
prefixes of one input sequence). The paper's claim: for LLE < 0 the iteration
count is flat in `T`; for LLE > 0 it grows with `T` (up to the `T`-step bound).

Writes `predictability.csv` (one row per gain, seed, T) and
`predictability.png`, and prints the table gain / LLE / iterations at each T
(means over seeds; `*` marks a solve that hit `--max-steps`). `--D 100` sets the
state size, `--T 10 100 1000` the lengths (default: `--num-T` lengths log-spaced
from 10 to `--T-max`).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import parallel_rnn as prnn

from ._common import (
    by_mode,
    dtype_scope,
    format_table,
    parse,
    progress,
    pyplot,
    save_figure,
    study_parser,
    write_csv,
)


class MeanFieldRNN(eqx.Module):
    """`s' = W tanh(s) + u`, with zero-diagonal Gaussian `W` of gain `g`."""

    weight: jax.Array

    def __init__(self, gain: float, dim: int, key):
        w = gain * jax.random.normal(key, (dim, dim), jnp.float64) / np.sqrt(dim)
        self.weight = w * (1 - jnp.eye(dim, dtype=jnp.float64))

    def __call__(self, u, s):
        return self.weight @ jnp.tanh(s) + u


@eqx.filter_jit
def _deer(cell, inputs, s0, max_steps):
    sol = prnn.solve_parallel(cell, inputs, s0, prnn.DEER(), throw=False, max_steps=max_steps)
    return sol.num_steps, sol.converged


@eqx.filter_jit
def _lle(cell, inputs, s0, key):
    states = prnn.solve_sequential(cell, inputs, s0)
    return prnn.lyapunov_exponent(cell, inputs, states, s0, key=key)


def run_one(gain, seed, dim, Ts, noise, max_steps) -> list[dict]:
    """All lengths for one (gain, seed): the LLE and DEER's iterations at each T."""
    k_w, k_u, k_s, k_v = jax.random.split(jax.random.key(seed), 4)
    cell = MeanFieldRNN(gain, dim, k_w)
    u = noise * jax.random.normal(k_u, (max(Ts), dim), jnp.float64)
    s0 = jax.random.normal(k_s, (dim,), jnp.float64)
    lle = float(_lle(cell, u, s0, k_v))
    rows = []
    for T in Ts:
        cap = T if max_steps is None else min(T, max_steps)
        steps, conv = _deer(cell, u[:T], s0, cap)
        rows.append(
            dict(
                solver="DEER",
                dtype="float64",
                gain=gain,
                seed=seed,
                D=dim,
                lle=lle,
                T=T,
                num_steps=int(steps),
                converged=bool(conv),
                hit_max_steps=not bool(conv) and int(steps) >= cap,
                max_steps=cap,
            )
        )
    return rows


def run(args) -> list[dict]:
    dim = (args.D or [by_mode(args, smoke=8, quick=64, full=100)])[0]
    n_gain = args.gains or by_mode(args, smoke=2, quick=4, full=7)
    seeds = args.seeds or by_mode(args, smoke=1, quick=1, full=5)
    t_max = args.T_max or by_mode(args, smoke=16, quick=500, full=10_000)
    n_t = args.num_T or by_mode(args, smoke=1, quick=4, full=7)
    gains = [round(float(g), 3) for g in np.linspace(0.5, 2.0, n_gain)]
    Ts = args.T or sorted({int(round(t)) for t in np.geomspace(10, t_max, n_t)})
    rows = []
    jobs = [(g, args.seed + s) for g in gains for s in range(seeds)]
    for gain, seed in progress(jobs, desc="gain x seed"):
        rows += run_one(gain, seed, dim, Ts, args.noise, args.max_steps)
    return rows


def main(argv=None) -> list[dict]:
    p = study_parser(__doc__.split("\n\n")[0], solvers=("DEER",), dtype="float64")
    p.add_argument("--gains", type=int, default=None, help="number of gains in [0.5, 2]")
    p.add_argument("--seeds", type=int, default=None, help="networks per gain")
    p.add_argument("--T-max", type=int, default=None, help="longest sequence (paper: 1e4)")
    p.add_argument("--num-T", type=int, default=None, help="lengths, log-spaced from 10")
    p.add_argument("--noise", type=float, default=0.01, help="std of the inputs u_t")
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="DEER iteration cap (default T: every solve converges)",
    )
    args = parse(p, argv, solver_names=("DEER",))
    if args.dtype != "float64":
        p.error("this study measures iterations to a float64 tolerance: --dtype float64 only")
    with dtype_scope(args):
        rows = run(args)
    write_csv(args.out / "predictability.csv", rows)
    plot(rows, args.out / "predictability.png")
    seeds = len({r["seed"] for r in rows})
    print(
        f"\nMean-field tanh RNN, D = {rows[0]['D']}, float64, DEER, tol 1e-10, "
        f"{seeds} seed(s) per gain. Iterations to converge:\n"
    )
    print(summary_table(rows))
    print(f"\nWrote {args.out / 'predictability.csv'} and {args.out / 'predictability.png'}")
    return rows


def summary_table(rows) -> str:
    table = []
    for gain in sorted({r["gain"] for r in rows}):
        mine = [r for r in rows if r["gain"] == gain]
        first = [r for r in mine if r["T"] == mine[0]["T"]]  # one row per seed
        line = dict(gain=gain, LLE=float(np.mean([r["lle"] for r in first])))
        for T in sorted({r["T"] for r in mine}):
            at = [r for r in mine if r["T"] == T]
            mean = float(np.mean([r["num_steps"] for r in at]))
            star = "" if all(r["converged"] for r in at) else "*"
            line[f"T={T}"] = f"{mean:.3g}{star}"
        table.append(line)
    return format_table(table)


def plot(rows, path) -> None:
    plt = pyplot()
    from matplotlib import cm, colors

    lles = np.array([r["lle"] for r in rows])
    span = max(abs(lles.min()), abs(lles.max()), 1e-3)
    norm = colors.TwoSlopeNorm(vcenter=0.0, vmin=-span, vmax=span)
    cmap = plt.get_cmap("coolwarm")
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    Ts = sorted({r["T"] for r in rows})
    for gain, seed in sorted({(r["gain"], r["seed"]) for r in rows}):
        mine = sorted(
            (r for r in rows if r["gain"] == gain and r["seed"] == seed), key=lambda r: r["T"]
        )
        ax.plot(
            [r["T"] for r in mine],
            [r["num_steps"] for r in mine],
            "o-",
            ms=3,
            color=cmap(norm(mine[0]["lle"])),
        )
        last = mine[-1]
        ax2.scatter(
            last["lle"],
            last["num_steps"],
            color=cmap(norm(last["lle"])),
            marker="o" if last["converged"] else "x",
        )
    ax.plot(Ts, Ts, "k:", lw=0.8, label="T (worst case)")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="sequence length T",
        ylabel="DEER iterations to converge",
        title="iterations vs T",
    )
    ax.legend(fontsize="small")
    ax2.axvline(0.0, color="k", lw=0.8, ls=":")
    ax2.set(
        yscale="log",
        xlabel="largest Lyapunov exponent",
        ylabel=f"iterations at T = {Ts[-1]}",
        title="iterations vs LLE",
    )
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="LLE")
    save_figure(fig, path)


if __name__ == "__main__":
    main()
