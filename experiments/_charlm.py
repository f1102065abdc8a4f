"""A multi-layer character LM built from `parallel_rnn.nn`, and the same model by BPTT.

Shared by `train_charlm` (training curves) and `bench_training` (cost of a step).

The model: embedding (`width`) → `layers` × `prnn.nn.Block` (pre-norm residual:
`x + W_out h(LayerNorm(x))`, `h` the hidden states of an `nn.RNN` around a cell:
`ParaGRU`, `ParaLSTM`, or the dense `GRU`, `LSTM` of `parallel_rnn.cells`) →
LayerNorm → linear decoder to logits over `VOCAB`, all in one `prnn.nn.Stack`.

Two forward passes read the same parameters:

- `parallel_forward`: the `nn.Stack` itself (one `solve_parallel` per layer, exact
  adjoint gradients), with a warm start per layer (`guesses`);
- `bptt_forward`: the same blocks evaluated by hand with a `lax.scan` per layer
  (autodiff through it is BPTT); it uses no `parallel_rnn` code but the cells.

Both return the loss (mean cross-entropy, nats/char) and per layer the states
`(B, T, …)`, iterations `(B,)`, `converged` and `fell_back` `(B,)` (zeros / True /
False for BPTT).

The data are non-overlapping windows of `T + 1` characters of the offline corpus of
`experiments._trained` (docstrings of the standard library), indexed by example, so
that a warm start can be keyed by example index.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import parallel_rnn as prnn
from parallel_rnn import nn

from ._trained import VOCAB, corpus_ids


CELLS: dict[str, type] = {
    "paragru": prnn.cells.ParaGRU,
    "paralstm": prnn.cells.ParaLSTM,
    "gru": prnn.cells.GRU,
    "lstm": prnn.cells.LSTM,
}


def is_lstm(kind: str) -> bool:
    return kind in ("paralstm", "lstm")


class StackLM(eqx.Module):
    """Embedding → `nn.Stack` of `layers` residual blocks → LayerNorm → decoder."""

    embed: eqx.nn.Embedding
    stack: nn.Stack
    norm: eqx.nn.LayerNorm
    decoder: eqx.nn.Linear

    def __init__(self, kind: str, layers: int, width: int, hidden: int, dtype, *, key):
        ke, kd, *kb = jax.random.split(key, 2 + 2 * layers)
        self.embed = eqx.nn.Embedding(len(VOCAB), width, key=ke, dtype=dtype)
        cells = [CELLS[kind](width, hidden, dtype=dtype, key=k) for k in kb[:layers]]
        # The blocks' LayerNorm takes JAX's default dtype (float64 under x64).
        blocks = [nn.Block(nn.RNN(c), width, key=k) for c, k in zip(cells, kb[layers:])]
        self.stack = nn.Stack(blocks)
        self.norm = eqx.nn.LayerNorm(width, dtype=dtype)
        self.decoder = eqx.nn.Linear(width, len(VOCAB), key=kd, dtype=dtype)

    @property
    def dtype(self):
        return self.embed.weight.dtype

    @property
    def cells(self) -> list:
        return [b.layer.cell for b in self.stack.blocks]  # pyright: ignore

    def loss(self, x, ids):
        logits = jax.vmap(jax.vmap(lambda v: self.decoder(self.norm(v))))(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()


def with_solver(model, solver, *, rtol=None, atol=None, on_failure="fallback"):
    """`model` whose every `nn.RNN` uses `solver` (and the tolerances, failure policy)."""

    def replace(layer):
        return nn.RNN(layer.cell, solver, rtol=rtol, atol=atol, on_failure=on_failure)

    layers = lambda m: [b.layer for b in m.stack.blocks]
    return eqx.tree_at(layers, model, [replace(layer) for layer in layers(model)])


def zero_state(cell, dtype):
    h = jnp.zeros(cell.hidden_size, dtype)
    return (h, h) if isinstance(cell, (prnn.cells.ParaLSTM, prnn.cells.LSTM)) else h


def scan_states(cell, inputs, s0):
    """The hidden-state sequence by `lax.scan` (the BPTT reference; shares no solver code)."""

    def step(s, x):
        s = cell(x, s)
        return s, s

    return jax.lax.scan(step, s0, inputs)[1]


def _no_solve(batch: int):
    return jnp.zeros(batch, jnp.int32), jnp.ones(batch, bool), jnp.zeros(batch, bool)


def bptt_forward(model: StackLM, ids, guesses=None):
    """The loss by `lax.scan` layers (the `nn.Block`s' parameters, evaluated by hand)."""
    del guesses
    x = jax.vmap(jax.vmap(model.embed))(ids[:, :-1])
    aux = dict(states=[], iters=[], converged=[], fell_back=[])
    for block in model.stack.blocks:
        cell = block.layer.cell  # pyright: ignore
        u = jax.vmap(jax.vmap(block.norm))(x)  # pyright: ignore
        s = jax.vmap(lambda u_b: scan_states(cell, u_b, zero_state(cell, x.dtype)))(u)
        h = s[0] if isinstance(s, tuple) else s
        x = x + jax.vmap(jax.vmap(block.projection))(h)  # pyright: ignore
        n, c, f = _no_solve(ids.shape[0])
        for k, v in zip(aux, (s, n, c, f)):
            aux[k].append(v)
    return model.loss(x, ids), aux


def parallel_forward(model: StackLM, ids, guesses=None):
    """The loss through the `nn.Stack` (parallel solves), warm-started by `guesses`."""
    x = jax.vmap(jax.vmap(model.embed))(ids[:, :-1])
    x, results = model.stack(x, guesses=guesses)
    aux = dict(
        states=[r.states for r in results],
        iters=[r.num_steps for r in results],
        converged=[r.converged for r in results],
        fell_back=[r.fell_back for r in results],
    )
    return model.loss(x, ids), aux


def zero_guesses(model, batch: int, T: int):
    """Per layer an all-zero trajectory `(batch, T, …)` (the zero state repeated)."""
    return [
        jax.tree.map(lambda a: jnp.zeros((batch, T, *a.shape), a.dtype), zero_state(c, model.dtype))
        for c in model.cells
    ]


def windows(T: int, limit: int | None = None) -> np.ndarray:
    """Non-overlapping windows `(N, T + 1)` of the training text's character ids."""
    train_ids, _ = corpus_ids()
    N = len(train_ids) // (T + 1)
    if limit is not None:
        N = min(N, limit)
    return train_ids[: N * (T + 1)].reshape(N, T + 1)


def batch_indices(N: int, batch: int, steps: int, seed: int) -> np.ndarray:
    """`(steps, batch)` example indices: epochs of random permutations (each example once
    per epoch), the same for every method trained with `seed`."""
    rng = np.random.default_rng(seed)
    per_epoch = N // batch
    epochs = -(-steps // per_epoch)
    rows = [
        rng.permutation(N)[: per_epoch * batch].reshape(per_epoch, batch) for _ in range(epochs)
    ]
    return np.concatenate(rows)[:steps]


def optimiser(lr: float, steps: int) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(1.0), optax.adam(optax.cosine_decay_schedule(lr, steps, 0.1))
    )
