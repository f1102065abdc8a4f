"""Wall-clock and memory of sequential evaluation vs every parallel solver, over T and D.

    python -m experiments.timing --quick              # CPU, about a minute
    python -m experiments.timing --device gpu         # the full grid, on a GPU
    python -m experiments.timing --T 1e3 1e5 --D 8 64 --solvers DEER QuasiDEER

The DEER paper's speed benchmark (Fig 2: a GRU with input size = hidden size,
batch 16, float32, T from 1e3 to 1e6, D from 1 to 64) and the ELK paper's
time/memory figure (Fig 2 / Fig 6). For each (D, T) the sequential `lax.scan`
and each solver run on the same batch (a `vmap` of the whole solve), and we
record:

- `time_s` / `spread_s`: median and max-min of `--reps` runs after compilation
  and one warm-up, blocking on the result;
- `speedup`: sequential time / solver time (above 1: the solver is faster);
- `compiled_bytes`: temporaries + arguments + outputs of the compiled
  executable (XLA's memory analysis), the memory the run needs;
- `device_peak_bytes`: the GPU allocator's peak so far in the process (a running
  maximum, so it only reads as this run's peak where it grew); empty on CPU;
- `num_steps` (max over the batch), `converged` (all of the batch) and
  `max_abs_err` against the sequential states. Solves are capped at
  `--max-steps` iterations (default `min(T, 1000)`; 200 with `--quick`) because
  Picard needs about `T` of them on a GRU; a capped solve is reported as not
  converged and gets no speed-up.

Failures do not stop the sweep: out-of-memory is recorded as `oom` and then
skipped for larger T at that D, other errors as `error`, and the dense solvers
(`DEER`, `ELK`) are `skipped` where their Jacobians alone, `batch·T·D²·4`
bytes, exceed `--max-bytes`.

On a CPU the "parallel" solvers run their linear recurrences as sequential
scans (`scan="auto"`), so they cannot beat `lax.scan` there: the speed-ups
this study is about need a GPU. Writes `timing.csv` and `timing.png` into
`--out` and prints the speed-up table.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import parallel_rnn as prnn

from ._common import (
    available_solvers,
    by_mode,
    dtype_scope,
    executable_memory,
    format_table,
    parse,
    progress,
    pyplot,
    save_figure,
    select_device,
    study_parser,
    style,
    time_fn,
    write_csv,
)


FULL_T = (1_000, 3_000, 10_000, 30_000, 100_000, 300_000, 1_000_000)
FULL_D = (1, 2, 4, 8, 16, 32, 64)


def make_cell(dim: int, key, dtype=jnp.float32) -> tuple[eqx.Module, str]:
    """A GRU with input size = hidden size = `dim` and an analytic `diagonal_jacobian`."""
    return prnn.cells.GRU(dim, dim, key=key, dtype=dtype), "parallel_rnn.cells.GRU"


def _runner(name: str, solver, max_steps):
    """`(params, static, xs, h0) -> (states, num_steps, converged)` over a batch."""

    def run(params, static, xs, h0):
        cell = eqx.combine(params, static)
        if solver is None:
            states = jax.vmap(lambda x, h: prnn.solve_sequential(cell, x, h))(xs, h0)
            ones = jnp.ones(xs.shape[0], jnp.int32)
            return states, ones, ones.astype(bool)
        sol = jax.vmap(
            lambda x, h: prnn.solve_parallel(cell, x, h, solver, throw=False, max_steps=max_steps)
        )(xs, h0)
        return sol.states, sol.num_steps, sol.converged

    return run


def _peak_bytes(device) -> int | None:
    stats = device.memory_stats()
    return stats.get("peak_bytes_in_use") if stats else None


def _classify(err: Exception) -> str:
    msg = str(err)
    if (
        "RESOURCE_EXHAUSTED" in msg
        or "out of memory" in msg.lower()
        or isinstance(err, MemoryError)
    ):
        return "oom"
    return "error"


def measure(name, solver, cell, xs, h0, *, reps, max_steps, reference=None) -> dict:
    """Compile, run once, time `reps` runs; failures become a `status`, not an exception."""
    params, static = eqx.partition(cell, eqx.is_array)
    fn = jax.jit(_runner(name, solver, max_steps), static_argnums=1)
    row = dict(
        status="ok",
        time_s="",
        spread_s="",
        num_steps="",
        converged="",
        max_abs_err="",
        compiled_bytes="",
        device_peak_bytes="",
        message="",
    )
    try:
        compiled = fn.lower(params, static, xs, h0).compile()
        # Measured on the executable we also time: each configuration compiles once.
        row["compiled_bytes"] = executable_memory(compiled) or ""
        run = lambda: compiled(params, xs, h0)
        states, steps, conv = jax.block_until_ready(run())
        row["time_s"], row["spread_s"] = time_fn(run, reps=reps, warmup=0)
        row["num_steps"] = int(jnp.max(steps))
        row["converged"] = bool(jnp.all(conv))
        if reference is not None:
            row["max_abs_err"] = float(jnp.max(jnp.abs(states - reference)))
        row["device_peak_bytes"] = _peak_bytes(xs.devices().pop()) or ""
        return row, states
    except Exception as err:  # XlaRuntimeError / RESOURCE_EXHAUSTED and friends
        row["status"] = _classify(err)
        row["message"] = " ".join(str(err).split())[:200]
        return row, None


def run(args) -> list[dict]:
    Ts = args.T or by_mode(args, smoke=(32,), quick=(1_000, 10_000), full=FULL_T)
    Ds = args.D or by_mode(args, smoke=(2,), quick=(2, 8), full=FULL_D)
    batch = args.batch or by_mode(args, smoke=2, quick=4, full=16)
    reps = args.reps or by_mode(args, smoke=1, quick=3, full=5)
    names = args.solvers
    if args.smoke:  # seconds: the plumbing end to end, for the tests
        names = [n for n in names if n in ("DEER", "QuasiDEER")]
    # Picard needs about T iterations on a GRU (its A_t = I is far from the true
    # Jacobian), which would dominate the sweep: cap it and report it unconverged.
    cap = args.max_steps if args.max_steps is not None else (200 if args.quick else 1000)
    dtype = jnp.dtype(args.dtype)
    device = select_device(args.device)
    solver_list = available_solvers(names)

    rows = []
    failed_at = {}  # (solver, D) -> T of the first out-of-memory
    configs = [(D, T) for D in Ds for T in sorted(Ts)]
    for D, T in progress(configs, desc=f"timing on {device.platform}"):
        key_cell, key_x = jax.random.split(jax.random.fold_in(jax.random.key(args.seed), D))
        cell, cell_name = make_cell(D, key_cell, dtype)
        xs = jax.random.normal(key_x, (batch, T, D), dtype)
        h0 = jnp.zeros((batch, D), dtype)
        common = dict(
            device=device.platform, cell=cell_name, dtype=dtype.name, batch=batch, D=D, T=T
        )
        seq_row, ref = measure("sequential", None, cell, xs, h0, reps=reps, max_steps=None)
        seq_row["max_abs_err"] = 0.0 if ref is not None else ""
        rows.append(dict(common, solver="sequential", speedup=1.0, **seq_row))
        for name, solver in solver_list.items():
            row = dict(common, solver=name, speedup="")
            dense_bytes = dtype.itemsize * batch * T * D * D
            if solver.jacobian == "dense" and dense_bytes > args.max_bytes:
                message = f"dense Jacobians need {dense_bytes:.3g} B > --max-bytes"
                rows.append(dict(row, status="skipped", message=message))
                continue
            if (name, D) in failed_at:
                message = f"out of memory at T={failed_at[name, D]}"
                rows.append(dict(row, status="skipped", message=message))
                continue
            max_steps = min(T, cap) if cap > 0 else None
            got, _ = measure(
                name, solver, cell, xs, h0, reps=reps, max_steps=max_steps, reference=ref
            )
            got["hit_max_steps"] = (
                got["status"] == "ok"
                and not got["converged"]
                and got["num_steps"] >= (max_steps or T)
            )
            if got["status"] == "oom":
                failed_at[name, D] = T
            # A speed-up only means something for a solve that reached the tolerance.
            if got["status"] == "ok" and got["converged"] and seq_row["status"] == "ok":
                row["speedup"] = seq_row["time_s"] / got["time_s"]
            rows.append(dict(row, **got))
        del ref
    return rows


def main(argv=None) -> list[dict]:
    p = study_parser(__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=None, help="sequences per solve (vmap)")
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="iteration cap per solve; default min(T, 1000), 200 with --quick; "
        "0 means T (every solver then converges, Picard after ~T)",
    )
    p.add_argument(
        "--max-bytes",
        type=float,
        default=4e9,
        help="skip DEER/ELK where batch*T*D^2*itemsize bytes exceeds this",
    )
    args = parse(p, argv)
    with dtype_scope(args):
        rows = run(args)
    write_csv(args.out / "timing.csv", rows)
    plot(rows, args.out / "timing.png")
    device = select_device(args.device)
    r0 = rows[0]
    print(
        f"\nDevice: {device.device_kind} ({device.platform}), cell {r0['cell']}, "
        f"batch {r0['batch']}, {r0['dtype']}"
    )
    print("Speed-up over sequential (iterations in brackets; >1 means faster):\n")
    print(speedup_table(rows))
    print(f"\nWrote {args.out / 'timing.csv'} and {args.out / 'timing.png'}")
    return rows


def speedup_table(rows) -> str:
    methods = [m for m in dict.fromkeys(r["solver"] for r in rows) if m != "sequential"]
    table = []
    for (D, T), group in _groupby(rows, ("D", "T")).items():
        by = {r["solver"]: r for r in group}
        seq = by["sequential"]
        line = dict(D=D, T=T, seq_ms=1e3 * seq["time_s"] if seq["status"] == "ok" else "fail")
        for m in methods:
            r = by.get(m)
            if r is None:
                line[m] = ""
            elif r["status"] != "ok":
                line[m] = r["status"]
            else:
                su = f"{r['speedup']:.3g}x" if r["converged"] else "not conv."
                su = "hit max_steps" if r.get("hit_max_steps") else su
                line[m] = f"{su} ({r['num_steps']})"
        table.append(line)
    return format_table(table)


def _groupby(rows, keys):
    out = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def plot(rows, path) -> None:
    plt = pyplot()
    Ds = sorted({r["D"] for r in rows})
    methods = list(dict.fromkeys(r["solver"] for r in rows))
    fig, axes = plt.subplots(2, len(Ds), figsize=(3.6 * len(Ds), 6.4), squeeze=False)
    for j, D in enumerate(Ds):
        for m in methods:
            pts = [r for r in rows if r["D"] == D and r["solver"] == m and r["status"] == "ok"]
            pts.sort(key=lambda r: r["T"])
            if not pts:
                continue
            T = np.array([r["T"] for r in pts])
            fast = [r for r in pts if r["speedup"] != ""]
            if m != "sequential" and fast:
                axes[0, j].plot(
                    [r["T"] for r in fast],
                    [r["speedup"] for r in fast],
                    label=m,
                    **style(m),
                )
            mem = [r["compiled_bytes"] or math.nan for r in pts]
            axes[1, j].plot(T, np.array(mem, float), label=m, **style(m))
        axes[0, j].axhline(1.0, color="k", lw=0.8, ls=":")
        axes[0, j].set(xscale="log", yscale="log", title=f"D = {D}", xlabel="T")
        axes[1, j].set(xscale="log", yscale="log", xlabel="T")
    axes[0, 0].set_ylabel("speed-up over sequential")
    axes[1, 0].set_ylabel("compiled memory (bytes)")
    axes[1, -1].legend(fontsize="small")
    save_figure(fig, path)


if __name__ == "__main__":
    main()
