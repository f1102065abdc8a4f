"""Sequence sharding: per-device memory and time of `solve_sharded` vs the device count.

    python -m experiments.scaling [--quick | --smoke] [--out results]

Splits the time axis of one sequence over `P = 1, 2, 4, 8` devices (on a CPU,
forced host devices: this module sets
`XLA_FLAGS=--xla_force_host_platform_device_count=8` before JAX starts, unless
`XLA_FLAGS` is already set) and reports, per solver:

- `MiB_per_device`: XLA's compiled peak-memory estimate of the per-device program
  (temporaries + arguments + outputs), which should fall as `1/P`: each device
  holds `T/P` steps and their Jacobians (`T·D²` for DEER);
- `ms_per_iter`: wall time of a fixed number of iterations divided by that number
  (`max_steps`, `throw=False`), median of `--reps`.

Forced host devices share the machine's cores, so on a CPU the time column shows
the overhead of the collectives, not a speed-up; on `P` real accelerators each
device does `1/P` of the work. Sizes: DEER at `D = 64` and QuasiDEER at `D = 256`
(float32, a `cells.GRU`), `T = 8192` (`--quick`: 2048; `--smoke`: tiny). Writes
`scaling.csv` and `scaling.png`.
"""

import os


os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import parallel_rnn as prnn

from ._common import compiled_memory, format_table, parser, pyplot, time_fn, write_csv


INPUT_SIZE = 4
ITERS = 4


def measure(name: str, D: int, T: int, n: int, reps: int) -> dict:
    solver = prnn.DEER() if name == "DEER" else prnn.QuasiDEER()
    key = jax.random.key(0)
    cell = prnn.cells.GRU(INPUT_SIZE, D, key=key, dtype=jnp.float32)
    mesh = Mesh(np.array(jax.devices()[:n]), ("t",))
    xs = jax.random.normal(jax.random.key(1), (T, INPUT_SIZE), jnp.float32)
    xs = jax.device_put(xs, NamedSharding(mesh, P("t")))
    h0 = jnp.zeros((D,), jnp.float32)

    def solve(cell, xs, h0):
        sol = prnn.solve_sharded(
            cell, xs, h0, solver, mesh=mesh, axis_name="t", max_steps=ITERS, throw=False
        )
        return sol.states

    nbytes = compiled_memory(solve, cell, xs, h0)
    median, spread = time_fn(lambda: solve(cell, xs, h0), reps=reps)
    return dict(
        solver=name,
        D=D,
        T=T,
        devices=n,
        MiB_per_device=(nbytes or 0) / 2**20,
        ms_per_iter=1e3 * median / ITERS,
        spread_ms=1e3 * spread / ITERS,
    )


def main(argv=None) -> list[dict]:
    p = parser(__doc__)
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sizes = {"DEER": 64, "QuasiDEER": 256}
    if args.smoke:
        sizes, T = {"DEER": 4, "QuasiDEER": 8}, 64
    else:
        T = 2048 if args.quick else 8192
    reps = args.reps or (1 if args.smoke else 3)
    counts = [n for n in (1, 2, 4, 8) if n <= jax.device_count()]
    if args.smoke:
        counts = counts[:2]
    rows = [measure(s, D, T, n, reps) for s, D in sizes.items() for n in counts]
    for r in rows:
        base = next(b for b in rows if b["solver"] == r["solver"] and b["devices"] == 1)
        r["memory_ratio"] = r["MiB_per_device"] / base["MiB_per_device"]
    print(
        f"\nsolve_sharded, one sequence of T={T} split over P devices, float32, "
        f"backend={jax.default_backend()}, {ITERS} iterations timed"
    )
    print(format_table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "scaling.csv", rows)

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in sizes:
        sel = [r for r in rows if r["solver"] == name]
        label = f"{name} D={sizes[name]}"
        axes[0].loglog(
            [r["devices"] for r in sel], [r["MiB_per_device"] for r in sel], "o-", label=label
        )
        axes[1].semilogx(
            [r["devices"] for r in sel], [r["ms_per_iter"] for r in sel], "o-", label=label
        )
    first = [r for r in rows if r["devices"] == 1]
    ideal = [first[0]["MiB_per_device"] / n for n in counts]
    axes[0].loglog(counts, ideal, ":", color="grey", label="1/P")
    axes[0].set_ylabel("compiled MiB per device")
    axes[1].set_ylabel("ms per iteration")
    for ax in axes:
        ax.set_xlabel("devices P")
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "scaling.png", dpi=120)
    print(f"wrote {args.out / 'scaling.csv'} and {args.out / 'scaling.png'}")
    return rows


if __name__ == "__main__":
    main()
