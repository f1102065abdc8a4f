"""What one training step costs: parallel layers against BPTT through `lax.scan`.

    python -m experiments.bench_training [--quick] [--T 1e3 1e4 1e5] [--D 16 64 256]
        [--batch 1 8 64] [--cases layer_paragru layer_gru lm_paragru] [--device gpu]

A training step is the loss and its gradient in every parameter (forward +
backward; the optimiser's update is left out, the same for every method), compiled
once, then timed (blocked on the result). Cases:

- `layer_<cell>`: one recurrent layer (`paragru`, `paralstm`, `gru`, `lstm`: the
  cells of `parallel_rnn.cells`), input size = hidden size = `D`, random inputs,
  loss `mean(tanh(h) · v)`;
- `lm_<cell>`: the 2-layer character LM of `train_charlm` (width = hidden = `D`) on
  windows of the offline corpus.

Methods: `BPTT` (autodiff through a hand-written `lax.scan`), and each solver of
`--solvers` (default `DEER`, `QuasiDEER`; `QuasiDEER` is left out on `ParaGRU`,
whose Jacobian is diagonal: it would be the same algorithm as `DEER`) from the
zero guess (`cold`) and warm-started (`warm`) from the states of the same sequences
one Adam step earlier (`lr = 1e-3`), the best case of a per-example cache. The
methods of one configuration are timed in turns, `--reps` rounds, each keeping its
fastest run (`time_s`; `spread_s` is slowest - fastest).

Columns: `time_s`, `spread_s`, `compiled_mib` (XLA's memory analysis of the
compiled step: arguments + temporaries + outputs), `num_steps` (forward iterations,
max over the batch, summed over layers), `converged`, `time_vs_bptt` and
`memory_vs_bptt` (the parallel method divided by BPTT at the same size: below 1
the parallel step is cheaper), and the GPU cost model (`gpu_steps_parallel`,
`gpu_steps_bptt`, `gpu_break_even_T`; see docs/training.md). Dense-Jacobian
configurations whose compiled memory exceeds `--max-bytes` are `skipped`.
Writes `bench_training.csv` and `bench_training.png`.

Full grid: `T ∈ {1e3, 1e4, 1e5}`, `D ∈ {16, 64, 256}`, batch `∈ {1, 8, 64}` (for a
GPU). `--quick`: `T ∈ {1e3, 1e4}`, `D ∈ {16, 64}`, batch 4, three cases.
"""

import math
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import parallel_rnn as prnn
from parallel_rnn import nn
from parallel_rnn._cost import default_cost

from ._charlm import (
    CELLS,
    StackLM,
    bptt_forward,
    optimiser,
    parallel_forward,
    scan_states,
    with_solver,
    zero_state,
)
from ._common import (
    by_mode,
    dtype_scope,
    executable_memory,
    format_table,
    number,
    parse,
    progress,
    pyplot,
    save_figure,
    study_parser,
    write_csv,
)
from ._trained import corpus_ids


class OneLayer(eqx.Module):
    """One `nn.RNN` layer with a fixed-form loss, `mean(tanh(h) · v)`."""

    layer: nn.RNN
    v: jax.Array

    def __init__(self, kind: str, D: int, dtype, *, key):
        kc, kv = jax.random.split(key)
        self.layer = nn.RNN(CELLS[kind](D, D, dtype=dtype, key=kc))
        self.v = jax.random.normal(kv, (D,), dtype) / math.sqrt(D)

    @property
    def cells(self) -> list:
        return [self.layer.cell]


def layer_bptt(model: OneLayer, xs, guesses=None):
    del guesses
    cell = model.layer.cell
    s = jax.vmap(lambda x: scan_states(cell, x, zero_state(cell, xs.dtype)))(xs)
    h = s[0] if isinstance(s, tuple) else s
    n = jnp.zeros(xs.shape[0], jnp.int32)
    return jnp.mean(jnp.tanh(h) @ model.v), dict(states=[s], iters=[n], converged=[n == 0])


def layer_parallel(model: OneLayer, xs, guesses=None):
    h, r = model.layer(xs, guess=None if guesses is None else guesses[0])
    aux = dict(states=[r.states], iters=[r.num_steps], converged=[r.converged])
    return jnp.mean(jnp.tanh(h) @ model.v), aux


def set_solver(model, solver, on_failure):
    if isinstance(model, OneLayer):
        layer = nn.RNN(model.layer.cell, solver, on_failure=on_failure)
        return eqx.tree_at(lambda m: m.layer, model, layer)
    return with_solver(model, solver, on_failure=on_failure)


def make_case(case: str, T: int, D: int, batch: int, dtype, seed: int):
    """`(model, data, bptt forward, parallel forward)` of a case."""
    kind, cell = case.split("_", 1)
    key_model, key_data = jax.random.split(jax.random.key(seed))
    if kind == "layer":
        xs = jax.random.normal(key_data, (batch, T, D), dtype)
        return OneLayer(cell, D, dtype, key=key_model), xs, layer_bptt, layer_parallel
    if kind == "lm":
        text = corpus_ids()[0]
        starts = np.random.default_rng(seed).integers(0, len(text), batch)
        ids = jnp.asarray(text[(starts[:, None] + np.arange(T + 1)[None, :]) % len(text)])
        return StackLM(cell, 2, D, D, dtype, key=key_model), ids, bptt_forward, parallel_forward
    raise ValueError(f"unknown case {case!r}: layer_<cell> or lm_<cell>, cell in {sorted(CELLS)}")


def warm_guesses(model, data, fwd):
    """The states of `data` one Adam step (lr 1e-3) before `model'`; returns both."""
    loss = lambda m: fwd(m, data)
    (_, aux), grads = eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))(model)
    opt = optimiser(1e-3, 10)
    with jax.numpy_dtype_promotion("standard"):
        updates, _ = opt.update(grads, opt.init(eqx.filter(model, eqx.is_array)))
    return eqx.apply_updates(model, updates), aux["states"]


def compile_step(model, data, guesses, fwd):
    """The training step (loss, gradient, iterations per layer), compiled ahead of time."""
    dynamic, static = eqx.partition((model, data, guesses), eqx.is_array)

    def step(dynamic):
        model, data, guesses = eqx.combine(dynamic, static)
        (loss, aux), grads = eqx.filter_value_and_grad(fwd, has_aux=True)(model, data, guesses)
        iters = jnp.stack([jnp.max(n) for n in aux["iters"]])
        return loss, grads, iters, jnp.all(jnp.stack([jnp.all(c) for c in aux["converged"]]))

    compiled = jax.jit(step).lower(dynamic).compile()
    return lambda: compiled(dynamic)[2:], lambda: compiled(dynamic), executable_memory(compiled)


def gpu_model(row: dict, solver, layers: int) -> None:
    """Sequential-step counts of the GPU cost model (docs/training.md) and the break-even T.

    Parallel: per layer `(K + 2)·c(T)`, `K` forward iterations, one polishing Newton
    step and one adjoint recurrence, each about one iteration, `c(T) = a + b·log2 T`
    (the library's provisional GPU constants, `parallel_rnn/_cost.py`). BPTT: `2 T`
    per layer (a forward and a backward sweep of `T` dependent steps).
    """
    K = row["num_steps"] / layers
    c = lambda T: default_cost(solver, T, row["D"], backend="gpu")
    row["gpu_steps_parallel"] = layers * (K + 2) * c(row["T"])
    row["gpu_steps_bptt"] = 2 * layers * row["T"]
    # Smallest T (at the measured K) where the parallel step is cheaper.
    T = 2
    while 2 * T <= (K + 2) * c(T) and T < 1e12:
        T *= 1.05
    row["gpu_break_even_T"] = int(T)


def cost_solver(solver, cell):
    """The solver whose cost family describes `solver` on `cell` (DEER on a diagonal or
    block-structured cell runs diagonal scans)."""
    structured = getattr(CELLS[cell], "jacobian_structure", None) in ("diagonal", "block")
    return prnn.QuasiDEER() if structured and solver.jacobian == "dense" else solver


def _failed(row: dict, err: Exception) -> dict:
    oom = "RESOURCE_EXHAUSTED" in str(err) or "out of memory" in str(err).lower()
    return dict(row, status="oom" if oom else "error", message=str(err)[:200])


def measure(case, T, D, batch, args) -> list[dict]:
    dtype = jnp.dtype(args.dtype)
    model0, data, bptt_fwd, parallel_fwd = make_case(case, T, D, batch, dtype, args.seed)
    model, warm = warm_guesses(model0, data, bptt_fwd)
    layers = len(model.cells)
    cell = case.split("_", 1)[1]
    base = dict(case=case, T=T, D=D, batch=batch, dtype=dtype.name, layers=layers)
    methods = [("BPTT", None, False)]
    for name in args.solvers:
        if name == "QuasiDEER" and cell == "paragru":
            continue  # diagonal Jacobian: the same algorithm as DEER
        methods += [(name, getattr(prnn, name)(), False), (name, getattr(prnn, name)(), True)]
    rows, runs = [], {}
    for name, solver, use_warm in methods:
        row: dict[str, Any] = dict(base, method=name + (" warm" if use_warm else ""), solver=name)
        if solver is None:
            m, fwd = model, bptt_fwd
        else:
            m, fwd = set_solver(model, solver, args.on_failure), parallel_fwd
        try:
            probe, run, mem = compile_step(m, data, warm if use_warm else None, fwd)
            row["compiled_mib"] = mem / 2**20 if mem is not None else ""
            if mem is not None and mem > args.max_bytes:
                rows.append(dict(row, status="skipped", message=f"compiled {mem} bytes"))
                continue
            iters, conv = probe()  # also the warm-up run
        except Exception as err:  # out of memory: record and go on
            rows.append(_failed(row, err))
            continue
        row.update(status="ok", converged=bool(conv))
        if solver is not None:
            row["num_steps"] = int(np.sum(iters))
            row["num_steps_per_layer"] = "/".join(str(int(k)) for k in iters)
            gpu_model(row, cost_solver(solver, cell), layers)
        runs[len(rows)] = run
        rows.append(row)
    # The methods take turns, and each keeps its fastest run: load from other
    # processes on a shared machine only ever adds time, to whichever runs then.
    times = {i: [] for i in runs}
    for _ in range(args.reps):
        for i, run in runs.items():
            if rows[i]["status"] != "ok":
                continue
            try:
                t0 = time.perf_counter()
                jax.block_until_ready(run())
                times[i].append(time.perf_counter() - t0)
            except Exception as err:
                rows[i] = _failed(rows[i], err)
    for i, ts in times.items():
        if rows[i]["status"] == "ok":
            rows[i].update(time_s=min(ts), spread_s=max(ts) - min(ts))
    bptt = rows[0]
    for r in rows[1:]:
        if r["status"] == "ok" and bptt["status"] == "ok":
            r["time_vs_bptt"] = r["time_s"] / bptt["time_s"]
            if r.get("compiled_mib") and bptt.get("compiled_mib"):
                r["memory_vs_bptt"] = r["compiled_mib"] / bptt["compiled_mib"]
    return rows


def plot(rows: list[dict], path) -> None:
    plt = pyplot()
    cases = list(dict.fromkeys(r["case"] for r in rows))
    fig, axes = plt.subplots(2, len(cases), figsize=(4.5 * len(cases), 7), squeeze=False)
    for j, case in enumerate(cases):
        mine = [r for r in rows if r["case"] == case and r["status"] == "ok"]
        for method in dict.fromkeys(r["method"] for r in mine):
            look = dict(ls="-" if method == "BPTT" else "--" if "warm" in method else ":")
            for D, b in sorted({(r["D"], r["batch"]) for r in mine}):
                sel = [r for r in mine if (r["method"], r["D"], r["batch"]) == (method, D, b)]
                sel.sort(key=lambda r: r["T"])
                Ts = [r["T"] for r in sel]
                label = f"{method} D={D} B={b}"
                axes[0, j].loglog(Ts, [r["time_s"] for r in sel], marker="o", label=label, **look)
                mem = [r["compiled_mib"] for r in sel]
                if all(isinstance(m, float) for m in mem):
                    axes[1, j].loglog(Ts, mem, marker="o", label=label, **look)
        axes[0, j].set(title=f"{case}: one training step", xlabel="T", ylabel="time (s)")
        axes[1, j].set(title="compiled memory", xlabel="T", ylabel="MiB")
        axes[0, j].legend(fontsize="x-small")
    save_figure(fig, path)


def main(argv=None) -> list[dict]:
    p = study_parser(__doc__, solvers=("DEER", "QuasiDEER"))
    p.add_argument("--batch", type=number, nargs="+", default=None, help="batch size(s)")
    p.add_argument("--cases", nargs="+", default=None, help="layer_<cell> or lm_<cell>")
    p.add_argument("--max-bytes", type=float, default=8e9, help="skip larger compiled steps")
    p.add_argument(
        "--on-failure",
        choices=("ignore", "fallback"),
        default="ignore",
        help="the layers' policy (fallback compiles a sequential branch into the step)",
    )
    args = parse(p, argv, solver_names=("DEER", "QuasiDEER", "ELK", "QuasiELK", "Picard", "Jacobi"))
    Ts = args.T or by_mode(args, smoke=[32], quick=[1000, 10000], full=[1000, 10000, 100000])
    Ds = args.D or by_mode(args, smoke=[8], quick=[16, 64], full=[16, 64, 256])
    batches = args.batch or by_mode(args, smoke=[2], quick=[4], full=[1, 8, 64])
    cases = args.cases or by_mode(
        args,
        smoke=["layer_paragru"],
        quick=["layer_paragru", "layer_gru", "lm_paragru"],
        full=["layer_paragru", "layer_paralstm", "layer_gru", "layer_lstm", "lm_paragru", "lm_gru"],
    )
    args.reps = args.reps or by_mode(args, smoke=1, quick=5, full=5)
    rows = []
    with dtype_scope(args):
        grid = [(c, T, D, b) for c in cases for D in Ds for b in batches for T in Ts]
        for case, T, D, b in progress(grid, desc="configurations"):
            rows += measure(case, T, D, b, args)
    print(f"backend={jax.default_backend()}, {args.dtype}, fastest of {args.reps} interleaved runs")
    columns = ["case", "T", "D", "batch", "method", "num_steps_per_layer", "time_s", "time_vs_bptt",
               "compiled_mib", "memory_vs_bptt", "gpu_break_even_T", "status"]  # fmt: skip
    print(format_table(rows, columns))
    write_csv(args.out / "bench_training.csv", rows)
    plot(rows, args.out / "bench_training.png")
    print(f"wrote {args.out / 'bench_training.csv'}, {args.out / 'bench_training.png'}")
    return rows


if __name__ == "__main__":
    main()
