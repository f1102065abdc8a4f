"""Small trained models shipped with the tests (`tests/data/*.npz`, written by
`python -m experiments.make_test_data`), rebuilt from their arrays alone.

- `ar_gru3()`: the ELK paper's autoregressive GRU (3 hidden units, skip connection,
  mean/softplus-scale decoder) trained on a noisy sine wave, as a recurrence with
  state `[y_{t-1}, h]` (`D = 4`) driven by standard-normal noise; `T = 2000`.
  Marginally stable along its trajectory, unstable linearisation at the zero guess.
- `char_lstm_small()`: a character-level LSTM language model (embedding 8, 24 hidden
  units, state `(h, c)` so `D = 48`), teacher-forced on 1000 held-out characters:
  `xs` are the embeddings `(1000, 8)`.

Each returns `(cell, xs, s0)` in `dtype` (float32 by default).
"""

from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


DATA = Path(__file__).parent / "data"


def _load(name: str, dtype) -> dict:
    with np.load(DATA / f"{name}.npz") as f:
        return {k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in f.items()}


def _build(cls, *args, dtype, **arrays):
    """`cls(*args)` with its weights set to `arrays`. Only shapes are traced (no random
    init is run), which keeps loading fast on a busy machine."""
    shell = eqx.filter_eval_shape(cls, *args, key=jax.random.key(0), dtype=dtype)
    names = tuple(arrays)
    values = tuple(jnp.asarray(arrays[n]) for n in names)
    return eqx.tree_at(lambda m: tuple(getattr(m, n) for n in names), shell, values)


class ARGRUCell(eqx.Module):
    """`y_t = y_{t-1} + d_0 + softplus(d_1) x_t` with `d = decoder(GRU(y_{t-1}, h))`."""

    gru: eqx.nn.GRUCell
    decoder: eqx.nn.Linear

    def __call__(self, x_t, s):
        y, h = s[0], s[1:]
        h = self.gru(y[None], h)
        d = self.decoder(h)
        y_new = y + d[0] + jax.nn.softplus(d[1]) * x_t[0]
        return jnp.concatenate([y_new[None], h])


def ar_gru3(dtype=jnp.float32):
    a = _load("ar_gru3", dtype)
    gru_weights = {k: a[k] for k in ("weight_ih", "weight_hh", "bias", "bias_n")}
    gru = _build(eqx.nn.GRUCell, 1, 3, dtype=dtype, **gru_weights)
    decoder = _build(
        eqx.nn.Linear, 3, 2, dtype=dtype, weight=a["decoder_weight"], bias=a["decoder_bias"]
    )
    return ARGRUCell(gru, decoder), jnp.asarray(a["xs"]), jnp.zeros(4, dtype)


def char_lstm_small(dtype=jnp.float32):
    a = _load("char_lstm_small", dtype)
    embedding, tokens = a["embedding"], a["tokens"]
    weights = {k: a[k] for k in ("weight_ih", "weight_hh", "bias")}
    lstm = _build(eqx.nn.LSTMCell, embedding.shape[1], 24, dtype=dtype, **weights)
    xs = jnp.asarray(embedding[tokens.astype(np.int64)])
    h = jnp.zeros(24, dtype)
    return lstm, xs, (h, h)
