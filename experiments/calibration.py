"""The bounded mode's cost model, measured: one parallel iteration in sequential steps.

    python -m experiments.calibration [--quick] [--D 16 64] [--T 1e4] [--device gpu]

For an `eqx.nn.GRUCell` (input 4) of each size `D`, `prnn.calibrate` times one
iteration of every solver (the difference between solves stopped after 3 and after
1 iteration) and the sequential scan, on this backend. It prints and writes
(`calibration.csv`) the cost `c` of one iteration in sequential cell steps, `κ = c/T`
(the CPU model `c = κ·T`), and the default the library would use
(`parallel_rnn._cost.default_cost`). On a GPU, the measured `c` replaces the
provisional defaults of `_cost.py`.
"""

import equinox as eqx
import jax
import jax.numpy as jnp

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
    write_csv,
)


SOLVERS = (
    "DEER",
    "QuasiDEER",
    "ELK",
    "QuasiELK",
    "Picard",
    "Jacobi",
    "MultipleShooting",
)


def run(args) -> list[dict]:
    Ds = args.D or by_mode(args, smoke=[4], quick=[16, 64], full=[16, 64, 256])
    Ts = args.T or by_mode(args, smoke=[64], quick=[10_000], full=[10_000, 100_000])
    dtype = jnp.dtype(args.dtype)
    solver_list = solvers(args)
    rows = []
    with progress(range(len(Ds) * len(Ts) * len(solver_list)), desc="solvers") as bar:
        for D in Ds:
            for T in Ts:
                cell = eqx.nn.GRUCell(4, D, key=jax.random.key(args.seed), dtype=dtype)
                xs = jax.random.normal(jax.random.key(args.seed + 1), (T, 4), dtype)
                h0 = jnp.zeros(D, dtype)
                for name, solver in solver_list.items():
                    c = prnn.calibrate(cell, xs, h0, solver, reps=args.reps or 3)
                    rows.append(
                        dict(
                            solver=name,
                            D=D,
                            T=T,
                            backend=jax.default_backend(),
                            cost_steps=round(c, 1),
                            kappa=round(c / T, 3),
                            default_cost=round(default_cost(solver, T, D), 1),
                        )
                    )
                    bar.update(1)
    return rows


def main(argv=None) -> list[dict]:
    p = study_parser(__doc__, solvers=SOLVERS)
    args = parse(p, argv, solver_names=(*SOLVERS, "BlockQuasiDEER"))
    with dtype_scope(args):
        rows = run(args)
    write_csv(args.out / "calibration.csv", rows)
    print(format_table(rows))
    print(f"wrote calibration.csv into {args.out}")
    return rows


if __name__ == "__main__":
    main()
