"""Equinox's own GRU cell against `cells.GRU`: QuasiDEER and DEER time and compiled memory.

    python -m experiments.eqx_cells_table [--quick] [--T 100000] [--D 16]

The table of issue 12 (float32, GRU, input size 4, default tolerances), measured in
one run: for `eqx.nn.GRUCell` as the README passes it and for `cells.GRU`, the
solve time after compilation (median of `--reps`), the iterations, and the peak
memory of the compiled solve (`jax.jit(f).lower(...).compile().memory_analysis()`).
"""

import equinox as eqx
import jax
import jax.numpy as jnp

import parallel_rnn as prnn

from ._common import compiled_memory, format_table, parser, time_fn, write_csv


def main(argv=None) -> list[dict]:
    p = parser(__doc__)
    p.add_argument("--T", type=int, default=None)
    p.add_argument("--D", type=int, default=16)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    T = args.T or (64 if args.smoke else 10_000 if args.quick else 100_000)
    reps = args.reps or (1 if args.smoke else 5)
    D, f32 = args.D, jnp.float32
    eqx_cell = eqx.nn.GRUCell(4, D, key=jax.random.key(0), dtype=f32)
    cells = {"eqx.nn.GRUCell": eqx_cell, "cells.GRU": prnn.cells.GRU.wrap(eqx_cell)}
    xs = jax.random.normal(jax.random.key(1), (T, 4), f32)
    s0 = jnp.zeros(D, f32)
    rows = []
    for solver in (prnn.QuasiDEER(), prnn.DEER()):
        for name, cell in cells.items():
            solve = eqx.filter_jit(
                lambda c, x, s, solver=solver: prnn.solve_parallel(c, x, s, solver, throw=False)
            )
            sol = solve(cell, xs, s0)
            t, spread = time_fn(lambda: solve(cell, xs, s0), reps)
            mem = compiled_memory(prnn.solve_parallel, cell, xs, s0, solver, throw=False)
            rows.append(
                dict(
                    solver=type(solver).__name__,
                    cell=name,
                    D=D,
                    T=T,
                    iterations=int(sol.num_steps),
                    converged=bool(sol.converged),
                    time_ms=1e3 * t,
                    spread_ms=1e3 * spread,
                    mem_MB=None if mem is None else mem / 1e6,
                )
            )
    print(f"\nfloat32, backend={jax.default_backend()}")
    print(format_table(rows))
    write_csv(args.out / "eqx_cells_table.csv", rows)
    return rows


if __name__ == "__main__":
    main()
