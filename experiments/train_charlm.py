"""A multi-layer character LM trained through parallel layers, next to the same model by BPTT.

    python -m experiments.train_charlm [--quick] [--cells paragru gru] [--dtypes float32 float64]

The model (`experiments/_charlm.py`): embedding → `--layers` pre-norm residual
blocks around a recurrent cell (`ParaGRU`, `ParaLSTM`, or the dense `GRU`, `LSTM`
of `parallel_rnn.cells`; `--cells`) → LayerNorm → decoder, on non-overlapping
windows of `T + 1` characters of the offline corpus of `experiments._trained`.

For each cell and dtype it trains the model twice from the same initialisation on
the same minibatches (epochs of random permutations of the windows), with Adam
(cosine decay, gradients clipped to norm 1):

- **BPTT**: every layer by a hand-written `lax.scan`, autodiff through it;
- **parallel**: every layer by `solve_parallel` (`--solver`, default `DEER`) with
  its exact adjoint gradient, warm-started from the states that the same example
  had the last time it was seen (a per-layer cache keyed by example index).

It prints the largest relative difference of the two loss curves at equal steps and
logs, per layer and step, the iterations (max over the batch) of the training solve
and of forward solves of the same layer inputs from other guesses: `zero` (the
default guess), `prev` (the previous step's states: other sequences), `layer` (the
layer below's states, same sequences; layers above the first). Writes
`train_charlm.csv` (one row per method and step), `train_charlm_summary.csv` and
`train_charlm.png` (loss curves, their relative difference, iterations per layer).

Sizes: full: 2 layers, width = D = 64, T = 256, batch 16, 300 steps, all four cells,
float32 and float64. `--quick`: D = 32, T = 64, batch 8, 120 examples, 40 steps,
ParaGRU and the dense GRU (about two minutes on a 2-core CPU).
"""

import argparse
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import parallel_rnn as prnn

from ._charlm import (
    CELLS,
    StackLM,
    batch_indices,
    bptt_forward,
    optimiser,
    parallel_forward,
    windows,
    with_solver,
    zero_guesses,
)
from ._common import (
    by_mode,
    format_table,
    number,
    parse,
    progress,
    pyplot,
    save_figure,
    select_device,
    write_csv,
)


GUESSES = ("zero", "prev", "layer")


def _tree_take(tree, idx):
    return jax.tree.map(lambda a: a[idx], tree)


def _tree_put(tree, idx, values):
    return jax.tree.map(lambda a, v: a.at[idx].set(v), tree, values)


def make_step(fwd, opt, parallel: bool):
    """The jitted Adam step; for `parallel`, guesses come from the per-example cache."""

    @eqx.filter_jit
    def step(model, opt_state, ids, idx, cache):
        guesses = [_tree_take(c, idx) for c in cache] if parallel else None
        (loss, aux), grads = eqx.filter_value_and_grad(fwd, has_aux=True)(model, ids, guesses)
        # Optax mixes Python floats with int32 counts; the tests run with strict promotion.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = opt.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        model = eqx.apply_updates(model, updates)
        if parallel:
            cache = [_tree_put(c, idx, s) for c, s in zip(cache, aux["states"])]
        iters = jnp.stack([jnp.max(n) for n in aux["iters"]])
        conv = jnp.all(jnp.stack([jnp.all(c) for c in aux["converged"]]))
        fell_back = sum(jnp.sum(f) for f in aux["fell_back"])
        return model, opt_state, loss, iters, conv, fell_back, cache, aux["states"]

    return step


@eqx.filter_jit
def probe(model, ids, states, prev):
    """Forward-only iterations (max over the batch) of each layer from other guesses:
    `zero`, `prev` (previous step's states, other sequences) and `layer` (the states
    of the layer below, same sequences). Each block reads the same input as in the
    training step (the zero-guess output is passed on: equal to tolerance)."""
    x = jax.vmap(jax.vmap(model.embed))(ids[:, :-1])
    out = {}
    for k, block in enumerate(model.stack.blocks):
        y, zero = block(x)
        out[f"L{k}_zero"] = jnp.max(zero.num_steps)
        out[f"L{k}_prev"] = jnp.max(block(x, guess=prev[k])[1].num_steps)
        if k > 0:
            out[f"L{k}_layer"] = jnp.max(block(x, guess=states[k - 1])[1].num_steps)
        x = y
    return out


def train(method, model, data, batches, args, *, cell, probe_guesses):
    """One training run; rows per step (loss, iterations per layer, time)."""
    steps = len(batches)
    opt = optimiser(args.lr, steps)
    opt_state = opt.init(eqx.filter(model, eqx.is_array))
    parallel = method != "BPTT"
    T = data.shape[1] - 1
    cache = zero_guesses(model, data.shape[0], T)
    step = make_step(parallel_forward if parallel else bptt_forward, opt, parallel)
    prev = zero_guesses(model, batches.shape[1], T)
    same_width = len({c.hidden_size for c in model.cells}) == 1
    rows = []
    for i, idx in enumerate(progress(batches, desc=f"{cell} {method}", leave=False)):
        ids = jnp.asarray(data[idx])
        idx = jnp.asarray(idx)
        t0 = time.perf_counter()
        new_model, opt_state, loss, iters, conv, fell_back, cache, states = step(
            model, opt_state, ids, idx, cache
        )
        loss = float(loss)  # blocks until the step is done
        row = dict(cell=cell, method=method, step=i, loss=loss, converged=bool(conv))
        row["step_time_s"] = time.perf_counter() - t0
        if parallel:
            row["fell_back"] = int(fell_back)
            row.update({f"L{k}_train": int(n) for k, n in enumerate(iters)})
            if probe_guesses and same_width:
                row.update({k: int(v) for k, v in probe(model, ids, states, prev).items()})
        rows.append(row)
        model, prev = new_model, states
    return rows


def run(args) -> tuple[list[dict], list[dict]]:
    T = (args.T or [by_mode(args, smoke=16, quick=64, full=256)])[0]
    D = (args.D or [by_mode(args, smoke=8, quick=32, full=64)])[0]
    steps = args.steps or by_mode(args, smoke=4, quick=40, full=300)
    batch = args.batch or by_mode(args, smoke=4, quick=8, full=16)
    examples = args.examples or by_mode(args, smoke=8, quick=120, full=None)
    data = windows(T, examples)
    batches = batch_indices(len(data), batch, steps, args.seed)
    solver = getattr(prnn, args.solver)()
    rows, summary = [], []
    for dtype_name in args.dtypes:
        with (
            jax.enable_x64(dtype_name == "float64"),
            jax.default_device(select_device(args.device)),
        ):
            dtype = jnp.dtype(dtype_name)
            for cell in args.cells:
                model = StackLM(cell, args.layers, D, D, dtype, key=jax.random.key(args.seed))
                setup = dict(cell=cell, dtype=dtype_name, layers=args.layers, D=D, T=T)
                setup.update(batch=batch, examples=len(data), steps=steps, solver=args.solver)
                model = with_solver(model, solver, rtol=args.rtol, atol=args.atol)
                curves = {}
                for method in ("BPTT", args.solver):
                    curves[method] = train(
                        method, model, data, batches, args, cell=cell,
                        probe_guesses=not args.no_probe,
                    )  # fmt: skip
                    for r in curves[method]:
                        r.update(dtype=dtype_name)
                summary.append(summarise(curves, setup, epoch=len(data) // batch))
                rows += [r for c in curves.values() for r in c]
    return rows, summary


def summarise(curves: dict[str, list[dict]], setup: dict, epoch: int) -> dict:
    (method,) = [m for m in curves if m != "BPTT"]
    bptt = np.array([r["loss"] for r in curves["BPTT"]])
    par = np.array([r["loss"] for r in curves[method]])
    rel = np.abs(par - bptt) / np.abs(bptt)
    for r, d in zip(curves[method], rel):
        r["rel_diff_vs_BPTT"] = float(d)
    out = dict(setup, max_rel_diff=float(rel.max()), final_loss_bptt=float(bptt[-1]))
    out["final_loss_parallel"] = float(par[-1])
    out["not_converged"] = sum(not r["converged"] for r in curves[method])
    out["fell_back"] = sum(r["fell_back"] for r in curves[method])
    for m, c in curves.items():
        out[f"step_ms_{'bptt' if m == 'BPTT' else 'parallel'}"] = 1e3 * float(
            np.median([r["step_time_s"] for r in c[1:]] or [np.nan])
        )
    # Mean iterations per layer and guess, after the first epoch (the cache is then full).
    later = curves[method][epoch:] or curves[method]
    for key in sorted(k for k in later[0] if k.startswith("L") and "_" in k):
        out[f"iters_{key}"] = float(np.mean([r[key] for r in later]))
    return out


def plot(rows: list[dict], summary: list[dict], path) -> None:
    plt = pyplot()
    n = len(summary)
    fig, axes = plt.subplots(n, 3, figsize=(14, 3.4 * n), squeeze=False)
    for ax, s in zip(axes, summary):
        mine = [r for r in rows if r["cell"] == s["cell"] and r["dtype"] == s["dtype"]]
        title = f"{s['cell']} ×{s['layers']}, D={s['D']}, T={s['T']}, {s['dtype']}"
        for method, look in (("BPTT", dict(color="k", lw=2)), (s["solver"], dict(ls="--"))):
            rs = [r for r in mine if r["method"] == method]
            ax[0].plot([r["step"] for r in rs], [r["loss"] for r in rs], label=method, **look)
        par = [r for r in mine if r["method"] == s["solver"]]
        steps = [r["step"] for r in par]
        ax[1].semilogy(steps, [max(r["rel_diff_vs_BPTT"], 1e-17) for r in par], color="C3")
        ax[1].axhline(1e-5, color="grey", ls=":", label="1e-5")
        for k in sorted(k for k in par[0] if k.startswith("L") and "_" in k):
            look = dict(ls="-" if k.endswith("train") else ":", marker="." if "L0" in k else "x")
            ax[2].plot(steps, [r[k] for r in par], label=k.replace("train", "cache"), **look)
        ax[0].set(title=title, xlabel="Adam step", ylabel="loss (nats/char)")
        ax[1].set(title="|parallel - BPTT| / BPTT (0 drawn at 1e-17)", xlabel="Adam step")
        ax[2].set(title=f"{s['solver']} iterations per layer", xlabel="Adam step")
        ax[2].set_ylabel("iterations (max over batch)")
        for a in ax:
            a.legend(fontsize="small")
    save_figure(fig, path)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small sizes, for a CPU in minutes")
    p.add_argument("--out", type=Path, default=Path("results"), help="folder for CSV and PNG")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--T", type=number, nargs=1, default=None, help="sequence length")
    p.add_argument("--D", type=number, nargs=1, default=None, help="width = hidden size")
    p.add_argument("--seed", type=int, default=0, help="initialisation and batch order")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument("--solver", default="DEER", help="solver of the parallel layers")
    p.add_argument("--cells", nargs="+", choices=sorted(CELLS), default=None)
    p.add_argument("--dtypes", nargs="+", choices=("float32", "float64"), default=None)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=number, default=None)
    p.add_argument("--batch", type=number, default=None)
    p.add_argument("--examples", type=number, default=None, help="training windows used")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--rtol", type=float, default=None, help="solve tolerance (default: dtype's)")
    p.add_argument("--atol", type=float, default=None)
    p.add_argument("--no-probe", action="store_true", help="skip the other-guess solves")
    args = parse(p, argv, solver_names=())
    args.cells = args.cells or by_mode(
        args, smoke=["paragru"], quick=["paragru", "gru"], full=sorted(CELLS)
    )
    args.dtypes = args.dtypes or by_mode(
        args, smoke=["float32"], quick=["float32", "float64"], full=["float32", "float64"]
    )
    rows, summary = run(args)
    print(
        f"backend={jax.default_backend()}, solver={args.solver}, rtol={args.rtol}, atol={args.atol}"
    )
    print(format_table(summary))
    for s in summary:
        print(
            f"{s['cell']} {s['dtype']}: max relative difference of the loss curves "
            f"({s['solver']} vs BPTT, {s['steps']} steps): {s['max_rel_diff']:.2g}"
        )
    names = ("train_charlm.csv", "train_charlm_summary.csv", "train_charlm.png")
    write_csv(args.out / names[0], rows)
    write_csv(args.out / names[1], summary)
    plot(rows, summary, args.out / names[2])
    print("wrote " + ", ".join(str(args.out / n) for n in names))
    return summary


if __name__ == "__main__":
    main()
