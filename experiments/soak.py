"""Soak study: hundreds of distinct solves and gradients compiled in one process.

    python -m experiments.soak --quick                  # ~150 cases
    python -m experiments.soak                          # ~600 cases (two rounds, T = 40, 41)
    python -m experiments.soak --clear-every 50         # jax.clear_caches() every 50 cases

A pytest process that had compiled about 260 solve and gradient cases died with a
segmentation fault inside XLA's compilation of `jax.grad` of a `Picard` solve
(issue 23). This study compiles, in one process, every combination of

- cell: `eqx.nn.GRUCell`, `eqx.nn.LSTMCell` (tuple state), a `tanh` closure, a
  Lorenz-96 RK4 step written as a closure, `parallel_rnn.cells.Lorenz96`;
- solver: `DEER`, `QuasiDEER`, `BlockQuasiDEER`, `ELK`, `QuasiELK`, `Picard`, `Jacobi`;
- dtype float32 / float64, default or tight tolerances (1e-13 in float64);
- kind: the solve (checked against `lax.scan`) or `jax.grad` of a weighted sum of
  the states with respect to the inputs and `s_0` (checked against `jax.grad`
  through `lax.scan`),

each case a fresh closure (a fresh trace and compilation), with the issue's case
(`jax.grad` of `Picard` on the Lorenz-96 RK4 closure, T = 40, float64,
rtol = atol = 1e-13) interleaved every `--sentinel-every` cases. After every case
the CSV is rewritten (so a crash leaves the rows before it) with the process's
resident memory, its number of memory mappings (`/proc/self/maps`; Linux refuses
`mmap` past `vm.max_map_count`), its thread count and the number of live device
arrays. `faulthandler` writes the Python stack of a fatal signal to
`soak_faulthandler.txt` in `--out`. Writes `soak.csv` (and `soak.png`: the
mappings and memory against the case number).
"""

import argparse
import faulthandler
import itertools
import os
import resource
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp

import parallel_rnn as prnn

from ._common import format_table, pyplot, save_figure, study_parser, write_csv


SOLVERS = ("DEER", "QuasiDEER", "BlockQuasiDEER", "ELK", "QuasiELK", "Picard", "Jacobi")
CELLS = ("gru", "lstm", "tanh", "l96rk4", "lorenz96")
D, N_IN = 6, 3


def _proc_status() -> dict:
    """Resident memory, mappings and threads of this process (Linux; empty elsewhere)."""
    out: dict = {"maxrss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["rss_MiB"] = int(line.split()[1]) / 1024
                elif line.startswith("Threads:"):
                    out["threads"] = int(line.split()[1])
        with open("/proc/self/maps") as f:
            out["maps"] = sum(1 for _ in f)
    except OSError:
        pass
    return out


def _l96_rk4(forcing: float, dt: float):
    """A Lorenz-96 RK4 step written as a closure (no `eqx.Module`, no closed forms)."""

    def field(s):
        return (jnp.roll(s, -1) - jnp.roll(s, 2)) * jnp.roll(s, 1) - s + forcing

    def cell(x, s):
        k1 = field(s)
        k2 = field(s + 0.5 * dt * k1)
        k3 = field(s + 0.5 * dt * k2)
        k4 = field(s + dt * k3)
        return s + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4) + 0.01 * x

    return cell


def make_problem(name: str, dtype, T: int, seed: int):
    """`(cell, xs, s0)`; every call builds a new cell object (closures: a new function)."""
    k = jax.random.split(jax.random.key(seed), 4)
    if name == "gru":
        cell = eqx.nn.GRUCell(N_IN, D, key=k[0], dtype=dtype)
        s0 = jnp.zeros((D,), dtype)
    elif name == "lstm":
        cell = eqx.nn.LSTMCell(N_IN, D // 2, key=k[0], dtype=dtype)
        s0 = (jnp.zeros((D // 2,), dtype), jnp.zeros((D // 2,), dtype))
    elif name == "tanh":
        W = 0.9 * jax.random.normal(k[0], (D, D), dtype) / D**0.5
        U = jax.random.normal(k[1], (D, N_IN), dtype)
        cell = lambda x, s: jnp.tanh(W @ s + U @ x)
        s0 = jnp.zeros((D,), dtype)
    elif name == "l96rk4":
        cell = _l96_rk4(8.0, 0.01)
        s0 = 8.0 + jax.random.normal(k[1], (D,), dtype)
    elif name == "lorenz96":
        cell = prnn.cells.Lorenz96(D)
        s0 = 8.0 + jax.random.normal(k[1], (D,), dtype)
    else:
        raise ValueError(name)
    n_in = D if name in ("l96rk4", "lorenz96") else N_IN
    xs = jax.random.normal(k[2], (T, n_in), dtype)
    if name == "lorenz96":
        xs = 0.01 * xs
    weights = jax.random.normal(k[3], (T, D), dtype)
    return cell, xs, s0, weights


def _flat(states):
    leaves = jax.tree_util.tree_leaves(states)
    return jnp.concatenate([leaf.reshape(leaf.shape[0], -1) for leaf in leaves], axis=1)


def _solver(name: str, scan: str):
    cls = getattr(prnn, name)
    return cls(scan=scan)


def run_case(case: dict) -> dict:
    """Compile and run one case; the row records what happened, never raises."""
    row = dict(case)
    dtype = jnp.dtype(case["dtype"])
    tol = case["tol"]
    rtol = atol = None if tol == "default" else float(tol)
    solver = _solver(case["solver"], case["scan"])
    cell, xs, s0, weights = make_problem(case["cell"], dtype, case["T"], case["seed"])

    def parallel(xs, s0):
        sol = prnn.solve_parallel(cell, xs, s0, solver, rtol=rtol, atol=atol, throw=False)
        return _flat(sol.states), sol.num_steps, sol.converged

    def sequential(xs, s0):
        return _flat(prnn.solve_sequential(cell, xs, s0))

    try:
        t0 = time.perf_counter()
        if case["kind"] == "grad":

            def loss(fn):
                return lambda xs, s0: jnp.sum(fn(xs, s0)[0] * weights)

            par = jax.jit(jax.grad(loss(parallel), argnums=(0, 1)))
            seq = jax.jit(jax.grad(lambda xs, s0: jnp.sum(sequential(xs, s0) * weights), (0, 1)))
            compiled = par.lower(xs, s0).compile()
            row["compile_s"] = time.perf_counter() - t0
            got, ref = compiled(xs, s0), seq(xs, s0)
            fwd = jax.jit(parallel)(xs, s0)
            row["num_steps"], row["converged"] = int(fwd[1]), bool(fwd[2])
        else:
            compiled = jax.jit(parallel).lower(xs, s0).compile()
            row["compile_s"] = time.perf_counter() - t0
            out = compiled(xs, s0)
            got, ref = out[0], jax.jit(sequential)(xs, s0)
            row["num_steps"], row["converged"] = int(out[1]), bool(out[2])
        errs = jax.tree_util.tree_map(lambda a, b: jnp.max(jnp.abs(a - b)), got, ref)
        scale = jax.tree_util.tree_map(lambda b: jnp.max(jnp.abs(b)), ref)
        row["max_abs_err"] = float(max(jax.tree_util.tree_leaves(errs)))
        row["ref_scale"] = float(max(jax.tree_util.tree_leaves(scale)))
        row["status"] = "ok"
    except Exception as e:  # recorded, not raised
        row["status"] = "error"
        row["message"] = f"{type(e).__name__}: {str(e)[:200]}"
    row["time_s"] = time.perf_counter() - t0
    row["live_arrays"] = len(jax.live_arrays())
    row.update(_proc_status())
    return row


def cases(rounds: int, T: int, scans, seed: int, sentinel_every: int):
    """Every combination, round `r` at length `T + r` (new shapes: new compilations)."""
    out = []
    for r in range(rounds):
        grid = itertools.product(
            CELLS, SOLVERS, ("float32", "float64"), ("default", "tight"), ("solve", "grad"), scans
        )
        for cell, solver, dtype, tol, kind, scan in grid:
            if tol == "tight":
                tol = "1e-13" if dtype == "float64" else "1e-6"
            out.append(
                dict(cell=cell, solver=solver, dtype=dtype, tol=tol, kind=kind, scan=scan,
                     T=T + r, seed=seed + r)
            )  # fmt: skip
    sentinel = dict(
        cell="l96rk4", solver="Picard", dtype="float64", tol="1e-13", kind="grad",
        scan="auto", T=T, seed=seed,
    )  # fmt: skip
    if sentinel_every:
        with_sentinels = []
        for i, case in enumerate(out):
            if i % sentinel_every == 0:
                with_sentinels.append(dict(sentinel, sentinel=True))
            with_sentinels.append(case)
        out = with_sentinels
    return out


def plot(rows, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    n = [r["case"] for r in rows]
    ax[0].plot(n, [r.get("maps", 0) for r in rows])
    ax[0].set_xlabel("case")
    ax[0].set_ylabel("memory mappings")
    ax[1].plot(n, [r.get("rss_MiB", 0) for r in rows])
    ax[1].set_xlabel("case")
    ax[1].set_ylabel("resident MiB")
    fig.suptitle(f"soak: {len(rows)} cases in one process")
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None) -> list[dict]:
    p = study_parser(__doc__.split("\n\n")[0], dtype="float64")
    p.add_argument("--rounds", type=int, default=None, help="passes over the grid (T + round)")
    p.add_argument("--clear-every", type=int, default=0, help="jax.clear_caches() every N cases")
    p.add_argument("--sentinel-every", type=int, default=20, help="issue-23 case every N cases")
    p.add_argument("--start", type=int, default=0, help="skip the first N cases")
    p.add_argument("--limit", type=int, default=None, help="run at most N cases")
    p.add_argument("--scans", nargs="+", default=["auto"], choices=("auto", "associative"))
    args = p.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    rounds = args.rounds or {"smoke": 1, "quick": 1, "full": 2}[mode]
    T = (args.T or [40])[0]
    todo = cases(rounds, T, tuple(args.scans), args.seed, args.sentinel_every)
    if mode == "quick" and args.limit is None:
        todo = todo[: len(todo) // 2]
    if mode == "smoke":
        todo = [c for c in todo if c["cell"] == "tanh" and c["dtype"] == "float64"][:4]
    todo = todo[args.start :][: args.limit]

    args.out.mkdir(parents=True, exist_ok=True)
    crash_log = open(args.out / "soak_faulthandler.txt", "w")
    faulthandler.enable(file=crash_log, all_threads=True)
    try:
        rows = _soak(todo, args, crash_log)
    finally:
        faulthandler.enable(file=sys.__stderr__ or sys.stderr)
        crash_log.close()
    bad = [r for r in rows if r["status"] != "ok"]
    print(f"\n{len(rows)} cases, {len(bad)} errors")
    if bad:
        print(format_table(bad, ["case", "cell", "solver", "dtype", "tol", "kind", "message"]))
    plot(rows, args.out / "soak.png")
    return rows


def _soak(todo: list[dict], args: argparse.Namespace, crash_log) -> list[dict]:
    rows: list[dict] = []
    print(f"soak: {len(todo)} cases, pid {os.getpid()}", flush=True)
    with jax.enable_x64(True):
        for i, case in enumerate(todo):
            if args.clear_every and i and i % args.clear_every == 0:
                jax.clear_caches()
            # Where the crash log would point: the case being compiled.
            print(f"[{i}] {case}", file=crash_log, flush=True)
            row = dict(case=args.start + i, **run_case(case))
            rows.append(row)
            write_csv(args.out / "soak.csv", rows)
            print(
                f"[{i}] {row['cell']} {row['solver']} {row['dtype']} tol={row['tol']} "
                f"{row['kind']}: {row['status']} err={row.get('max_abs_err', float('nan')):.1e} "
                f"compile={row.get('compile_s', float('nan')):.1f}s maps={row.get('maps')} "
                f"rss={row.get('rss_MiB', 0):.0f}MiB",
                flush=True,
            )
    return rows


if __name__ == "__main__":
    main()
