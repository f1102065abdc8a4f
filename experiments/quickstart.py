"""Quick comparison: sequential evaluation vs every solver on an `eqx.nn.GRUCell`.

    python -m experiments.quickstart [--quick] [--out results]

Prints iterations, max abs error vs `lax.scan`, and wall-clock after compilation
for each solver (float32, D=16, T=10000), and writes `quickstart.csv` and
`quickstart.png` (residual vs iteration).
"""

import argparse

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import parallel_rnn as prnn

from ._common import available_solvers, format_table, parser, progress, pyplot, time_fn, write_csv


def main(argv=None) -> list[dict]:
    p = parser(__doc__)
    p.add_argument("--T", type=int, default=10_000)
    p.add_argument("--D", type=int, default=16)
    p.add_argument(
        "--max-steps",
        type=int,
        default=300,
        help="iteration cap (Picard needs ~T iterations on a GRU; it shows as not converged)",
    )
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    T = 50 if args.smoke else 1000 if args.quick else args.T
    reps = 1 if args.smoke else args.reps or (3 if args.quick else 5)

    cell = eqx.nn.GRUCell(4, args.D, key=jax.random.key(0), dtype=jnp.float32)
    xs = jax.random.normal(jax.random.key(1), (T, 4), jnp.float32)
    h0 = jnp.zeros(args.D, jnp.float32)

    sequential = eqx.filter_jit(prnn.solve_sequential)
    ref = sequential(cell, xs, h0)
    t_seq, _ = time_fn(lambda: sequential(cell, xs, h0), reps)
    rows = [
        dict(
            method="sequential",
            iterations="",
            converged="",
            max_abs_err=0.0,
            time_ms=1e3 * t_seq,
            vs_sequential=1.0,
        )
    ]
    traces = {}
    for name, solver in progress(available_solvers().items(), desc="solvers"):
        # The trace costs one scalar write per iteration: time the same compiled solve.
        run = lambda: prnn.solve_parallel(
            cell, xs, h0, solver, max_steps=min(T, args.max_steps), throw=False, trace=True
        )
        sol = run()
        t, _ = time_fn(run, reps)
        traces[name] = np.asarray(sol.trace)
        rows.append(
            dict(
                method=name,
                iterations=int(sol.num_steps),
                converged=bool(sol.converged),
                max_abs_err=float(jnp.max(jnp.abs(sol.states - ref))),
                time_ms=1e3 * t,
                vs_sequential=t / t_seq,
            )
        )

    print(f"\neqx.nn.GRUCell, D={args.D}, T={T}, float32, backend={jax.default_backend()}")
    print(format_table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "quickstart.csv", rows)

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, tr in traces.items():
        n = np.arange(1, len(tr) + 1)
        ok = np.isfinite(tr)
        ax.semilogy(n[ok], tr[ok], marker=".", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("max |residual|")
    ax.set_title(f"GRU D={args.D}, T={T}, float32")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "quickstart.png", dpi=120)
    print(f"wrote {args.out / 'quickstart.csv'} and {args.out / 'quickstart.png'}")
    return rows


if __name__ == "__main__":
    main()
