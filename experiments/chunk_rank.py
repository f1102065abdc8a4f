"""Multiple shooting with low-rank chunk Jacobians against the exact ones.

    python -m experiments.chunk_rank [--quick] [--out results] [--T 2048 16384 65536]
        [--cases vad_lstm:0:32,16 ar_lstm:1:1,4 ...]

For each long-memory case of `experiments/_long_memory.py` (`name:seed:ranks`):
the numerical rank of its chunk maps' Jacobians along the sequential trajectory
(singular values above 1e-1, 1e-2 and 1e-3 at `L = ⌈√T⌉`, three chunks spread
over the sequence), then `MultipleShooting()` with the exact chunk Jacobians and
with `rank=r` for each listed `r`: iterations, converged, seconds of one solve
after compilation (best of `--reps`), max-abs error against `solve_sequential`.
Float32, zero state, default guess and tolerances, `throw=False`.

Outputs (in `--out`): `chunk_rank.csv` (`case`, `T`, `D`, `L`, `rank` (`exact` or
`r`), `num_steps`, `converged`, `time_s`, `max_abs_err`, `sv_gt_1e-1/2/3`: the
largest count over the three chunks) and `chunk_rank.png` (seconds against `T`,
one panel per case). `--smoke` runs a small untrained GRU instead (seconds).
"""

import argparse
import math
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import parallel_rnn as prnn
from parallel_rnn._problem import FlatCell, make_spec
from parallel_rnn._solver.shooting import _ChunkMap, default_chunk

from ._common import by_mode, format_table, number, parse, parser, pyplot, save_figure, write_csv
from ._measure import errors


DEFAULT_CASES = (
    "vad_lstm:0:32,16", "count_lstm:0:16,8", "count_gru:0:8",
    "ar_gru16:0:1,4", "ar_lstm:1:1,4",
)  # fmt: skip
THRESHOLDS = (1e-1, 1e-2, 1e-3)


def flat_cell(cell, s0) -> FlatCell:
    """`cell` on flat `(D,)` states (`.spec.ravel` flattens a state pytree)."""
    return FlatCell(cell, None, make_spec(s0))


def chunk_singular_values(cell, xs, s0, states, L: int, chunks: int = 3) -> np.ndarray:
    """Singular values `(chunks, D)` of the chunk maps' Jacobians (`jacfwd`) at
    `chunks` chunks spread over the sequential trajectory `states`."""
    fn = flat_cell(cell, s0)
    flat_states = jax.vmap(fn.spec.ravel)(states)
    T = flat_states.shape[0]
    P = T // L
    chunk_map = _ChunkMap(fn, None)  # (x_chunk, entry) -> the end state

    out = []
    for k in np.linspace(1, P - 1, chunks).astype(int):
        x_chunk = jax.tree_util.tree_map(lambda a, k=k: a[k * L : (k + 1) * L], xs)
        jac = jax.jacfwd(chunk_map, argnums=1)(x_chunk, flat_states[k * L - 1])
        out.append(np.linalg.svd(np.asarray(jac, np.float64), compute_uv=False))
    return np.array(out)


def timed_solve(cell, xs, s0, solver, reps: int) -> tuple[prnn.Solution, float]:
    """`solve_parallel`'s solution (`throw=False`) and its best time over `reps`
    calls after compilation."""
    solve = jax.jit(lambda xs, s0: prnn.solve_parallel(cell, xs, s0, solver, throw=False))
    sol = jax.block_until_ready(solve(xs, s0))
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(solve(xs, s0))
        best = min(best, time.perf_counter() - t0)
    return sol, best


def measure(name, cell, xs, s0, ranks, reps: int) -> list[dict]:
    T = jax.tree_util.tree_leaves(xs)[0].shape[0]
    ref = jax.jit(lambda xs, s0: prnn.solve_sequential(cell, xs, s0))(xs, s0)
    L = default_chunk(T)
    sv = chunk_singular_values(cell, xs, s0, ref, L)
    D = sv.shape[1]
    counts = {f"sv_gt_{t:g}": int((sv > t).sum(1).max()) for t in THRESHOLDS}
    rows = []
    for rank in (None, *ranks):
        sol, best = timed_solve(cell, xs, s0, prnn.MultipleShooting(rank=rank), reps)
        rows.append(dict(
            case=name, T=T, D=D, L=L, rank="exact" if rank is None else rank,
            num_steps=int(sol.num_steps), converged=bool(sol.converged), time_s=best,
            max_abs_err=errors(sol.states, ref)[0], **counts,
        ))  # fmt: skip
        print(" ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)
    return rows


def _smoke_case(T: int):
    cell = prnn.cells.GRU.wrap(eqx.nn.GRUCell(2, 6, dtype=jnp.float32, key=jax.random.key(0)))
    xs = jax.random.normal(jax.random.key(1), (T, 2), jnp.float32)
    return cell, xs, jnp.zeros(6, jnp.float32)


def plot(path: Path, rows: list[dict]) -> None:
    plt = pyplot()
    cases = list(dict.fromkeys(r["case"] for r in rows))
    fig, axes = plt.subplots(1, len(cases), figsize=(3.2 * len(cases), 3), squeeze=False)
    for ax, case in zip(axes[0], cases):
        mine = [r for r in rows if r["case"] == case]
        for rank in dict.fromkeys(r["rank"] for r in mine):
            pts = [(r["T"], r["time_s"]) for r in mine if r["rank"] == rank]
            ax.plot(*zip(*pts), marker="o", label=f"rank {rank}")
        ax.set(xscale="log", yscale="log", xlabel="T", title=case)
    axes[0][0].set_ylabel("seconds per solve")
    axes[0][0].legend(fontsize="small")
    save_figure(fig, path)


def case_parser(description: str, cases, case_help: str) -> argparse.ArgumentParser:
    """`--quick`, `--out`, `--reps`, `--T` and `--cases`: the options both shooting
    studies take (they run trained models at float32, so no `--D`/`--dtype`)."""
    p = parser(description)
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--T", type=number, nargs="+", default=None, help="sequence length(s)")
    p.add_argument("--cases", nargs="+", default=list(cases), help=case_help)
    return p


def main(argv=None) -> list[dict]:
    p = case_parser((__doc__ or "").splitlines()[0], DEFAULT_CASES, "name:seed:r1,r2")
    args = parse(p, argv, solver_names=())
    lengths = args.T or by_mode(args, smoke=(64,), quick=(2048, 16384), full=(2048, 16384, 65536))
    reps = args.reps or by_mode(args, smoke=1, quick=1, full=2)
    rows: list[dict] = []
    for T in lengths:
        if args.smoke:
            rows += measure("gru_smoke", *_smoke_case(T), ranks=(2,), reps=reps)
            continue
        from ._long_memory import load_case  # noqa: PLC0415 (trains on first use)

        for spec in args.cases:
            name, seed, ranks = spec.split(":")
            cell, xs, s0, _ = load_case(name, T, seed=int(seed), verbose=False)
            ranks = tuple(int(r) for r in ranks.split(","))
            rows += measure(f"{name}_s{seed}", cell, xs, s0, ranks, reps)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "chunk_rank.csv", rows)
    plot(args.out / "chunk_rank.png", rows)
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
