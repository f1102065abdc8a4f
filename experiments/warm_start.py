"""Warm starts across training steps when the minibatches change: which guess saves iterations.

    python -m experiments.warm_start [--quick] [--solvers DEER QuasiDEER] [--out results]

A character-level language model (embedding, a `parallel_rnn.nn.Stack` of two
GRU blocks of width `D`, a linear readout) learns next-character prediction on
the text of this repository's `docs/` (offline). The text is cut into `N`
examples of `T` characters; each epoch visits them in a new random order, in
minibatches of `B`, so consecutive steps see different examples. The model is
trained with Adam; at every step, before the update, the forward solves of the
new minibatch are run once per warm-start strategy (same parameters, same
inputs) and their iterations are recorded per layer (mean over the minibatch):

- `cold`: zeros (the default guess);
- `previous batch`: the states the previous step computed (for other examples);
- `keyed by index`: the states last computed for these same examples, from a
  cache of shape `(N, T, D)` per layer (zeros before an example is first seen);
- `previous layer`: layer 1 cold, layer 2 from layer 1's states of the same call;
- `same batch`: the states of this minibatch at the previous step's parameters
  (an extra forward pass, for reference: the best any warm start can do).

The sequential scan would take `T` steps per layer. Writes `warm_start.csv`
(one row per step, strategy and layer), `warm_start_summary.csv` and
`warm_start.png`. float32 by default. `--quick`: T=256, D=16, N=64, B=8, 80
steps (ten epochs; a few minutes on a 2-core CPU); full: T=512, D=64, N=256,
B=16, 200 steps.
"""

from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import parallel_rnn as prnn
from parallel_rnn import nn

from ._common import (
    by_mode,
    dtype_scope,
    format_table,
    parse,
    progress,
    pyplot,
    save_figure,
    solvers,
    study_parser,
    write_csv,
)


STRATEGIES = ("cold", "previous batch", "keyed by index", "previous layer", "same batch")
LAYERS = 2


def load_text(T: int, N: int) -> tuple[np.ndarray, int]:
    """`N` examples of `T + 1` character codes from docs/*.md, and the vocabulary size."""
    root = Path(__file__).resolve().parent.parent
    text = "\n".join(p.read_text() for p in sorted((root / "docs").rglob("*.md")))
    vocab = sorted(set(text))
    codes = np.array([vocab.index(c) for c in text], np.int32)
    need = N * (T + 1)
    if len(codes) < need:
        codes = np.tile(codes, need // len(codes) + 1)
    return codes[:need].reshape(N, T + 1), len(vocab)


class CharModel(eqx.Module):
    embed: eqx.nn.Embedding
    stack: nn.Stack
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, vocab: int, width: int, solver, dtype, *, key):
        keys = jax.random.split(key, 2 + 2 * LAYERS)
        self.embed = eqx.nn.Embedding(vocab, width, key=keys[0], dtype=dtype)
        blocks = []
        for i in range(LAYERS):
            gru = eqx.nn.GRUCell(width, width, key=keys[2 + 2 * i], dtype=dtype)
            cell = prnn.cells.GRU.wrap(gru)
            blocks.append(nn.Block(nn.RNN(cell, solver), width, key=keys[3 + 2 * i]))
        self.stack = nn.Stack(blocks)
        self.norm = eqx.nn.LayerNorm(width, dtype=dtype)
        self.head = eqx.nn.Linear(width, vocab, key=keys[1], dtype=dtype)

    def logits(self, h):
        return jax.vmap(jax.vmap(lambda v: self.head(self.norm(v))))(h)


def forward(model: CharModel, tokens, guesses, chain: bool):
    """The stack on a minibatch; with `chain`, layer `i > 0` starts from layer `i - 1`'s
    states of this call instead of its entry in `guesses`."""
    h = jax.vmap(jax.vmap(model.embed))(tokens)
    results = []
    for i, block in enumerate(model.stack.blocks):
        guess = results[-1].states if chain and i > 0 else guesses[i]
        h, result = block(h, guess=guess)
        results.append(result)
    return h, results


@eqx.filter_jit
def measure(model, tokens, guesses, chain):
    """Per-layer mean iterations over the minibatch, and the states."""
    _, results = forward(model, tokens, guesses, chain)
    return [jnp.mean(r.num_steps) for r in results], [r.states for r in results]


def make_step(optimiser):
    def loss_fn(model, tokens, guesses):
        h, results = forward(model, tokens[:, :-1], guesses, False)
        logits = model.logits(h)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
        return jnp.mean(loss), results

    @eqx.filter_jit
    def step(model, opt_state, tokens, guesses):
        (loss, results), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(
            model, tokens, guesses
        )
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimiser.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss, results

    return step


def run_solver(name, solver, data, vocab, setup, args) -> list[dict]:
    T, D, B, steps, dtype = (setup[k] for k in ("T", "D", "B", "steps", "dtype"))
    N = data.shape[0]
    model = CharModel(vocab, D, solver, jnp.dtype(dtype), key=jax.random.key(args.seed))
    optimiser = optax.adam(args.lr)
    opt_state = optimiser.init(eqx.filter(model, eqx.is_array))
    step = make_step(optimiser)
    zeros = [jnp.zeros((B, T, D), dtype) for _ in range(LAYERS)]
    cache = [np.zeros((N, T, D), dtype) for _ in range(LAYERS)]
    rng = np.random.default_rng(args.seed)
    order = np.concatenate([rng.permutation(N) for _ in range(steps * B // N + 1)])
    previous_states, previous_model = zeros, None
    rows = []
    for i in progress(range(steps), desc=name, leave=False):
        index = order[i * B : (i + 1) * B]
        tokens = jnp.asarray(data[index])
        inputs = tokens[:, :-1]
        guesses = {
            "cold": (zeros, False),
            "previous batch": (previous_states, False),
            "keyed by index": ([jnp.asarray(c[index]) for c in cache], False),
            "previous layer": (zeros, True),
        }
        if previous_model is not None:
            guesses["same batch"] = (measure(previous_model, inputs, zeros, False)[1], False)
        states = zeros
        for strategy, (g, chain) in guesses.items():
            iters, s = measure(model, inputs, g, chain)
            if strategy == "keyed by index":
                states = s
            for layer, n in enumerate(iters, start=1):
                row = dict(solver=name, step=i, strategy=strategy, layer=layer)
                rows.append(dict(row, num_steps=float(n)))
        for c, s in zip(cache, states):
            c[index] = np.asarray(s)
        previous_states, previous_model = states, model
        model, opt_state, loss, _ = step(model, opt_state, tokens, states)
        rows.append(dict(solver=name, step=i, strategy="loss", layer=0, num_steps=float(loss)))
    return rows


def tabulate(rows: list[dict], setup: dict) -> list[dict]:
    """Mean iterations per solver, strategy and layer, over all steps and over the
    steps after the first epoch (when every example has been seen once)."""
    epoch = setup["N"] // setup["B"]
    summary = []
    for name in dict.fromkeys(r["solver"] for r in rows):
        cold = {}
        for strategy in STRATEGIES:
            for layer in range(1, LAYERS + 1):
                picked = [
                    r
                    for r in rows
                    if (r["solver"], r["strategy"], r["layer"]) == (name, strategy, layer)
                ]
                if not picked:
                    continue
                later = [r["num_steps"] for r in picked if r["step"] >= epoch]
                mean_later = float(np.mean(later)) if later else float("nan")
                if strategy == "cold":
                    cold[layer] = mean_later
                summary.append(
                    dict(
                        solver=name,
                        strategy=strategy,
                        layer=layer,
                        iters_all_steps=float(np.mean([r["num_steps"] for r in picked])),
                        iters_after_epoch_1=mean_later,
                        vs_cold=mean_later / cold[layer],
                        T=setup["T"],
                    )
                )
    return summary


def plot(rows: list[dict], setup: dict, path) -> None:
    plt = pyplot()
    names = list(dict.fromkeys(r["solver"] for r in rows))
    fig, axes = plt.subplots(
        len(names), LAYERS, figsize=(5 * LAYERS, 3.5 * len(names)), squeeze=False
    )
    for row, name in zip(axes, names):
        for layer, ax in enumerate(row, start=1):
            for strategy in STRATEGIES:
                picked = [
                    r
                    for r in rows
                    if (r["solver"], r["strategy"], r["layer"]) == (name, strategy, layer)
                ]
                steps, iters = [r["step"] for r in picked], [r["num_steps"] for r in picked]
                if picked:
                    ax.plot(steps, iters, label=strategy)
            ax.axvline(setup["N"] // setup["B"], color="grey", lw=0.8, ls=":")
            ax.set_title(f"{name}, layer {layer} (T={setup['T']}, D={setup['D']})")
            ax.set_xlabel("Adam step (dotted: end of epoch 1)")
            ax.set_ylabel("forward iterations (batch mean)")
    axes[0][0].legend(fontsize=8)
    save_figure(fig, path)


def main(argv=None) -> list[dict]:
    p = study_parser(__doc__ or "", solvers=("DEER", "QuasiDEER"))
    p.add_argument("--steps", type=int, default=None, help="Adam steps (default 200)")
    p.add_argument("--batch", type=int, default=None, help="examples per minibatch (default 16)")
    p.add_argument("--examples", type=int, default=None, help="examples N (default 256)")
    p.add_argument("--lr", type=float, default=3e-3)
    args = parse(p, argv)
    setup = dict(
        T=(args.T or [by_mode(args, smoke=32, quick=256, full=512)])[0],
        D=(args.D or [by_mode(args, smoke=8, quick=16, full=64)])[0],
        N=args.examples or by_mode(args, smoke=8, quick=64, full=256),
        B=args.batch or by_mode(args, smoke=4, quick=8, full=16),
        steps=args.steps or by_mode(args, smoke=3, quick=80, full=200),
        dtype=args.dtype,
    )
    data, vocab = load_text(setup["T"], setup["N"])
    rows = []
    with dtype_scope(args):
        for name, solver in solvers(args).items():
            rows += run_solver(name, solver, data, vocab, setup, args)
    print(
        f"char LM: 2 x GRU blocks, D={setup['D']}, T={setup['T']}, N={setup['N']}, "
        f"B={setup['B']}, {setup['steps']} Adam steps (lr={args.lr}), {setup['dtype']}, "
        f"backend={jax.default_backend()}"
    )
    summary = tabulate([r for r in rows if r["strategy"] != "loss"], setup)
    print(format_table(summary))
    losses = [r["num_steps"] for r in rows if r["strategy"] == "loss"]
    print(f"training loss: {losses[0]:.3f} -> {losses[-1]:.3f}")
    write_csv(args.out / "warm_start.csv", rows)
    write_csv(args.out / "warm_start_summary.csv", summary)
    plot([r for r in rows if r["strategy"] != "loss"], setup, args.out / "warm_start.png")
    print(f"wrote {args.out / 'warm_start.csv'}, warm_start_summary.csv, warm_start.png")
    return summary


if __name__ == "__main__":
    main()
