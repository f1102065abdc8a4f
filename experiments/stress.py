"""Stress study: QuasiDEER on one very long sequence and on a large vmap batch.

    python -m experiments.stress            # T = 10^6 and 256 x 10^4, D = 64 (minutes on CPU)
    python -m experiments.stress --quick    # T = 10^5 and 32 x 10^4

A `parallel_rnn.cells.GRU` (an `eqx.nn.GRUCell` with its closed-form Jacobian
diagonal) of hidden size `D = 64`, float32, solved by `solve_parallel` with its
defaults (`QuasiDEER`, `max_steps = T`, `throw=False`):

- **long**: one sequence of `T = 10^6` steps;
- **batch**: `jax.vmap` over `B = 256` sequences of `T = 10^4` steps.

For each it records XLA's compiled peak-memory estimate (temporaries + arguments
+ outputs, `_common.executable_memory`) next to the size of one `(B, T, D)` float32
state array, the compile time, the median wall-clock time of the solve after
compilation, the iterations (max over the batch), whether every sequence
converged, and the largest deviation from sequential evaluation (`lax.scan`). A
failure of any kind is a row with `status` other than `ok`, not a crash. Writes
`stress.csv` and `stress.png` into `--out`.
"""

import argparse
import time

import jax
import jax.numpy as jnp

import parallel_rnn as prnn

from ._common import executable_memory, format_table, number, parser, pyplot, time_fn, write_csv


INPUT_SIZE = 4


def _problem(B: int, T: int, D: int):
    cell = prnn.cells.GRU(INPUT_SIZE, D, key=jax.random.key(0), dtype=jnp.float32)
    shape = (T, INPUT_SIZE) if B == 0 else (B, T, INPUT_SIZE)
    xs = jax.random.normal(jax.random.key(1), shape, jnp.float32)
    return cell, xs, jnp.zeros((D,), jnp.float32)


def _solve(cell, xs, h0):
    one = lambda x: prnn.solve_parallel(cell, x, h0, throw=False)
    return one(xs) if xs.ndim == 2 else jax.vmap(one)(xs)


def _sequential(cell, xs, h0):
    one = lambda x: prnn.solve_sequential(cell, x, h0)
    return one(xs) if xs.ndim == 2 else jax.vmap(one)(xs)


def measure(case: str, B: int, T: int, D: int, reps: int) -> dict:
    """`B = 0`: a single sequence (no vmap)."""
    row = dict(case=case, B=max(B, 1), T=T, D=D, states_MiB=max(B, 1) * T * D * 4 / 2**20)
    try:
        cell, xs, h0 = _problem(B, T, D)
        t0 = time.perf_counter()
        solve = jax.jit(_solve).lower(cell, xs, h0).compile()
        row["compile_s"] = time.perf_counter() - t0
        nbytes = executable_memory(solve)
        row["compiled_MiB"] = None if nbytes is None else nbytes / 2**20
        sol = jax.block_until_ready(solve(cell, xs, h0))
        row["time_s"], row["spread_s"] = time_fn(lambda: solve(cell, xs, h0), reps=reps, warmup=0)
        ref = jax.jit(_sequential)(cell, xs, h0)
        row["num_steps"] = int(jnp.max(sol.num_steps))
        row["converged"] = bool(jnp.all(sol.converged))
        row["finite"] = bool(jnp.all(jnp.isfinite(sol.states)))
        row["max_abs_err"] = float(jnp.max(jnp.abs(sol.states - ref)))
        row["status"] = "ok" if row["converged"] and row["finite"] else "not converged"
    except Exception as e:  # recorded, not raised: the row says what failed
        row["status"] = f"error: {type(e).__name__}: {str(e)[:200]}"
    return row


def main(argv=None) -> list[dict]:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--D", type=number, default=None, help="state size (default 64)")
    p.add_argument("--long-T", type=number, default=None, help="length of the long sequence")
    p.add_argument("--batch", type=int, default=None, help="sequences in the vmap batch")
    p.add_argument("--batch-T", type=number, default=None, help="length of each batched sequence")
    args = p.parse_args(argv)
    if args.smoke:
        D, long_T, B, batch_T = 8, 2_000, 4, 200
    elif args.quick:
        D, long_T, B, batch_T = 64, 100_000, 32, 10_000
    else:
        D, long_T, B, batch_T = 64, 1_000_000, 256, 10_000
    D, long_T = args.D or D, args.long_T or long_T
    B, batch_T = args.batch or B, args.batch_T or batch_T
    reps = args.reps or (1 if not args.smoke else 2)
    rows = [
        measure("long", 0, long_T, D, reps),
        measure("batch", B, batch_T, D, reps),
    ]
    print(f"\nQuasiDEER, cells.GRU, float32, backend={jax.default_backend()}")
    print(format_table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "stress.csv", rows)

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    labels = [f"{r['case']}\nB={r['B']}, T={r['T']}" for r in rows]
    axes[0].bar(labels, [r.get("compiled_MiB") or 0 for r in rows], label="compiled peak")
    axes[0].bar(labels, [r["states_MiB"] for r in rows], width=0.4, label="one state array")
    axes[0].set_ylabel("MiB")
    axes[0].legend()
    axes[1].bar(labels, [r.get("time_s") or 0 for r in rows])
    axes[1].set_ylabel("solve time (s)")
    fig.suptitle(f"QuasiDEER stress, D = {D}, float32, {jax.default_backend()}")
    fig.tight_layout()
    fig.savefig(args.out / "stress.png", dpi=120)
    print(f"wrote {args.out / 'stress.csv'} and {args.out / 'stress.png'}")
    return rows


if __name__ == "__main__":
    main()
