"""Equinox's own GRU cell against `cells.GRU`: QuasiDEER and DEER time and compiled memory.

    python -m experiments.eqx_cells_table [--quick] [--T 100000] [--D 16]

The table of issue 12 (float32, GRU, input size 4, default tolerances), measured in
one run: for `eqx.nn.GRUCell` as the README passes it and for `cells.GRU`, the
solve time after compilation (median of `--reps`), the iterations, and the peak
memory of the compiled solve (`jax.jit(f).lower(...).compile().memory_analysis()`).

`--tol 1e-4` also runs the library at the published code's float32 tolerance.

Side by side with the published code (optional, never in CI): point the environment
variable `PRNN_PUBLISHED_ELK` at a checkout of the ELK paper's code (the folder that
holds the `elk` package) and its `seq1d` (quasi-DEER with its closed-form GRU
diagonal, and DEER) runs on the same GRU weights, written in its Flax parameter
layout, at its own tolerance (1e-4 in float32), measured the same way.
"""

import importlib
import os
import sys

import equinox as eqx
import jax
import jax.numpy as jnp

import parallel_rnn as prnn

from ._common import compiled_memory, format_table, number, parser, time_fn, write_csv


def flax_gru_params(cell: eqx.nn.GRUCell) -> dict:
    """`cell`'s weights in the published code's Flax `GRUCell` layout (kernels are `(in, out)`).

    Equinox: `r, z = σ(W_i x + b + W_h h)`, `n = tanh(W_in x + b_n' + r ⊙ (W_hn h + b_n))`;
    Flax: the same with biases on the input maps of `r, z, n` and on the hidden map of `n`.
    """
    H = cell.hidden_size
    wi, wh = cell.weight_ih.reshape(3, H, -1), cell.weight_hh.reshape(3, H, H)
    b = cell.bias.reshape(3, H) if cell.bias is not None else jnp.zeros((3, H), wi.dtype)
    bn = cell.bias_n if cell.bias_n is not None else jnp.zeros(H, wi.dtype)
    zero = jnp.zeros(H, wi.dtype)
    params = {}
    for g, gate in enumerate("rzn"):
        params["i" + gate] = {"kernel": wi[g].T, "bias": b[g]}
        params["h" + gate] = {"kernel": wh[g].T, "bias": bn if gate == "n" else zero}
    return {"params": params}


def flax_gru_step(h, x, params):
    """One step of Flax's `GRUCell` in the published code's `func(y, x, params)` form."""
    p = params["params"]

    def dense(name, v):
        return p[name]["kernel"].T @ v + p[name]["bias"]

    r = jax.nn.sigmoid(dense("ir", x) + dense("hr", h))
    z = jax.nn.sigmoid(dense("iz", x) + dense("hz", h))
    n = jnp.tanh(dense("in", x) + r * dense("hn", h))
    return (1 - z) * n + z * h


def published_rows(path: str, cell, xs, s0, reps: int) -> list[dict]:
    """The published `seq1d` (quasi-DEER and DEER) on `cell`'s weights, measured like ours."""
    sys.path.insert(0, path)
    seq1d = importlib.import_module("elk.algs.deer").seq1d
    params = flax_gru_params(cell)
    ref = prnn.solve_sequential(cell, xs, s0)
    rows = []
    for label, quasi in (("QuasiDEER", True), ("DEER", False)):

        def solve(xs, s0, params, quasi=quasi):
            return seq1d(
                flax_gru_step,
                s0,
                xs,
                params,
                quasi=quasi,
                qmem_efficient=quasi,
                max_iter=xs.shape[0],
            )

        run = jax.jit(solve)
        states, iterations = run(xs, s0, params)
        t, spread = time_fn(lambda: run(xs, s0, params), reps)
        mem = compiled_memory(solve, xs, s0, params)
        rows.append(
            dict(
                solver=label,
                cell="published seq1d (Flax GRU layout)",
                D=s0.shape[0],
                T=xs.shape[0],
                tol=1e-4,
                iterations=int(iterations),
                converged=None,
                max_abs_err=float(jnp.max(jnp.abs(states - ref))),
                time_ms=1e3 * t,
                spread_ms=1e3 * spread,
                mem_MB=None if mem is None else mem / 1e6,
            )
        )
    return rows


def _tolerance(text: str) -> float | None:
    return None if text == "default" else float(text)


def main(argv=None) -> list[dict]:
    p = parser(__doc__)
    p.add_argument("--T", type=number, default=None)
    p.add_argument("--D", type=number, default=16)
    p.add_argument(
        "--tol",
        type=_tolerance,
        nargs="+",
        default=[None],
        help="rtol = atol of the library's solves ('default': its own), e.g. --tol default 1e-4",
    )
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    T = args.T or (64 if args.smoke else 10_000 if args.quick else 100_000)
    reps = args.reps or (1 if args.smoke else 5)
    D, f32 = args.D, jnp.float32
    eqx_cell = eqx.nn.GRUCell(4, D, key=jax.random.key(0), dtype=f32)
    cells = {"eqx.nn.GRUCell": eqx_cell, "cells.GRU": prnn.cells.GRU.wrap(eqx_cell)}
    xs = jax.random.normal(jax.random.key(1), (T, 4), f32)
    s0 = jnp.zeros(D, f32)
    ref = prnn.solve_sequential(eqx_cell, xs, s0)
    rows = []
    for solver in (prnn.QuasiDEER(), prnn.DEER()):
        for tol in args.tol:
            for name, cell in cells.items():
                options = dict(throw=False, rtol=tol, atol=tol)
                solve = eqx.filter_jit(
                    lambda c, x, s, solver=solver, options=options: prnn.solve_parallel(
                        c, x, s, solver, **options
                    )
                )
                sol = solve(cell, xs, s0)
                t, spread = time_fn(lambda: solve(cell, xs, s0), reps)
                mem = compiled_memory(prnn.solve_parallel, cell, xs, s0, solver, **options)
                rows.append(
                    dict(
                        solver=type(solver).__name__,
                        cell=name,
                        D=D,
                        T=T,
                        tol="default" if tol is None else tol,
                        iterations=int(sol.num_steps),
                        converged=bool(sol.converged),
                        max_abs_err=float(jnp.max(jnp.abs(sol.states - ref))),
                        time_ms=1e3 * t,
                        spread_ms=1e3 * spread,
                        mem_MB=None if mem is None else mem / 1e6,
                    )
                )
    published = os.environ.get("PRNN_PUBLISHED_ELK")
    if published:
        rows += published_rows(published, eqx_cell, xs, s0, reps)
    print(f"\nfloat32, backend={jax.default_backend()}")
    print(format_table(rows))
    write_csv(args.out / "eqx_cells_table.csv", rows)
    return rows


if __name__ == "__main__":
    main()
