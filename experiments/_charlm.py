"""A multi-layer character LM, evaluated layer by layer by BPTT (`lax.scan`) or in parallel.

Shared by `train_charlm` (training curves) and `bench_training` (cost of a step).

The model: embedding (`width`) → `layers` residual blocks → LayerNorm → linear
decoder to logits over `VOCAB`. A block is pre-norm and residual, as in ParaRNN's
and most RNN-LM stacks: `x + W_out h(LayerNorm(x))`, where `h` is the hidden-state
sequence of a recurrent cell (`ParaGRU`, `ParaLSTM`, or the dense `GRU`, `LSTM` of
`parallel_rnn.cells`) read from the normalised input, from a zero state.

Each layer's recurrence is evaluated by one `LayerEval`:

- `bptt_eval`: a hand-written `lax.scan` (autodiff through it is BPTT);
- `parallel_eval(solver, rtol, atol)`: `prnn.solve_parallel` with the guess given,
  `throw=False`; iterations and convergence are returned for logging.

The data are non-overlapping windows of `T + 1` characters of the offline corpus of
`experiments._trained` (docstrings of the standard library), indexed by example, so
that a warm start can be keyed by example index.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import parallel_rnn as prnn

from ._trained import VOCAB, corpus_ids


CELLS: dict[str, type] = {
    "paragru": prnn.cells.ParaGRU,
    "paralstm": prnn.cells.ParaLSTM,
    "gru": prnn.cells.GRU,
    "lstm": prnn.cells.LSTM,
}


def is_lstm(kind: str) -> bool:
    return kind in ("paralstm", "lstm")


class Block(eqx.Module):
    """`x + W_out h(LayerNorm(x))`, `h` the hidden states of `cell` over the sequence."""

    norm: eqx.nn.LayerNorm
    cell: eqx.Module
    proj: eqx.nn.Linear
    lstm: bool = eqx.field(static=True)
    hidden: int = eqx.field(static=True)

    def __init__(self, kind: str, width: int, hidden: int, dtype, *, key):
        kc, kp = jax.random.split(key)
        self.norm = eqx.nn.LayerNorm(width, dtype=dtype)
        self.cell = CELLS[kind](width, hidden, dtype=dtype, key=kc)
        self.proj = eqx.nn.Linear(hidden, width, key=kp, dtype=dtype)
        self.lstm = is_lstm(kind)
        self.hidden = hidden

    def init_state(self, dtype):
        h = jnp.zeros(self.hidden, dtype)
        return (h, h) if self.lstm else h

    def cell_inputs(self, x):
        return jax.vmap(self.norm)(x)

    def output(self, x, states):
        h = states[0] if self.lstm else states
        return x + jax.vmap(self.proj)(h)


class StackLM(eqx.Module):
    """Embedding → `layers` × `Block` → LayerNorm → decoder (logits over `VOCAB`)."""

    embed: eqx.nn.Embedding
    blocks: tuple[Block, ...]
    norm: eqx.nn.LayerNorm
    decoder: eqx.nn.Linear

    def __init__(self, kind: str, layers: int, width: int, hidden: int, dtype, *, key):
        ke, kd, *kb = jax.random.split(key, 2 + layers)
        self.embed = eqx.nn.Embedding(len(VOCAB), width, key=ke, dtype=dtype)
        self.blocks = tuple(Block(kind, width, hidden, dtype, key=k) for k in kb)
        self.norm = eqx.nn.LayerNorm(width, dtype=dtype)
        self.decoder = eqx.nn.Linear(width, len(VOCAB), key=kd, dtype=dtype)

    @property
    def dtype(self):
        return self.embed.weight.dtype


# A layer evaluator: (cell, inputs (T, M), s0, guess or None) -> (states, num_steps, converged)
LayerEval = Callable[[Any, Any, Any, Any], tuple[Any, jax.Array, jax.Array]]


def scan_states(cell, inputs, s0):
    """The hidden-state sequence by `lax.scan` (the BPTT reference; shares no solver code)."""

    def step(s, x):
        s = cell(x, s)
        return s, s

    return jax.lax.scan(step, s0, inputs)[1]


def bptt_eval(cell, inputs, s0, guess):
    del guess
    return scan_states(cell, inputs, s0), jnp.array(0, jnp.int32), jnp.array(True)


def parallel_eval(solver, rtol=None, atol=None) -> LayerEval:
    def evaluate(cell, inputs, s0, guess):
        sol = prnn.solve_parallel(
            cell, inputs, s0, solver, guess=guess, rtol=rtol, atol=atol, throw=False
        )
        return sol.states, sol.num_steps, sol.converged

    return evaluate


def forward(model: StackLM, ids, evaluate: LayerEval, guesses):
    """Loss of a batch `ids (B, T + 1)` (mean cross-entropy, nats/char) and per layer:
    the states `(B, T, …)`, the layer's inputs `(B, T, width)` (for extra solves), the
    iterations `(B,)` and `converged` `(B,)`. `guesses`: per layer `(B, T, …)` or None."""
    x = jax.vmap(jax.vmap(model.embed))(ids[:, :-1])
    states, inputs, iters, conv = [], [], [], []
    for block, guess in zip(model.blocks, guesses):
        u = jax.vmap(block.cell_inputs)(x)
        s0 = block.init_state(model.dtype)
        one = lambda u_b, g_b, block=block, s0=s0: evaluate(block.cell, u_b, s0, g_b)
        s, n, c = jax.vmap(one)(u, guess)
        x = jax.vmap(block.output)(x, s)
        states.append(s)
        inputs.append(u)
        iters.append(n)
        conv.append(c)
    logits = jax.vmap(jax.vmap(lambda v: model.decoder(model.norm(v))))(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()
    return loss, (states, inputs, iters, conv)


def zero_guesses(model: StackLM, batch: int, T: int):
    """Per layer the default guess of `solve_parallel` (the zero state repeated)."""
    return [
        jax.tree.map(lambda a: jnp.zeros((batch, T, *a.shape), a.dtype), b.init_state(model.dtype))
        for b in model.blocks
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
