"""Trained recurrent models for the studies: definitions, Optax training, weight cache.

    from experiments._trained import load_case
    cell, xs, s0, meta = load_case("ar_gru3", T=9999, quick=True, seed=0)
    sol = prnn.solve_parallel(cell, xs, s0, prnn.ELK())

`load_case` trains the model on first use (a minute or less on a CPU in quick
mode) and caches the weights under `results/trained/` (`eqx.tree_serialise_leaves`
plus a JSON file with the training log); later calls only load them.

Cases (`CASES`):

- `ar_gru3`, `ar_gru16`, `ar_lstm`: the autoregressive model of the ELK paper's
  Figure 4 (Gonzalez et al., 2024). An Equinox GRU (3 or 16 hidden units) or LSTM
  (8 hidden units) reads the previous output `y_{t-1}`; a linear decoder of the
  hidden state gives a mean (with a skip connection, `mean = y_{t-1} + d_0`) and a
  scale (`softplus(d_1)`). It is trained with teacher forcing and a Gaussian
  negative log-likelihood on a noisy sine wave. Evaluated as a recurrence: the
  state is the flat array `[y_{t-1}, hidden]` (`D = 1 + H`, or `1 + 2H` for the
  LSTM's `(h, c)`), the input `x_t` (shape `(1,)`) is the standard-normal noise
  that samples `y_t = mean + scale · x_t`; `s0 = 0`.
- `char_lstm`, `char_gru` (and `char_lstm_small`, 24 hidden units, embedding 8,
  the model shipped with the tests): character-level language models (embedding 16, LSTM
  with 64 hidden units so `D = 128` with `(h, c)`, or a GRU with 128) trained with
  Adam on ~60k characters of English technical prose that every Python has
  offline: the docstrings of a fixed list of standard-library modules
  (`inspect.getdoc`, deterministic for a given Python version). Evaluated
  teacher-forced on held-out characters from a zero state: `x_t` is the
  embedding of character `t` (`xs` has shape `(T, 16)`; the lookup is done here,
  outside the cell), the state is Equinox's `(h, c)` tuple (LSTM) or `h` (GRU).

The LM cells are `parallel_rnn.cells.LSTM` / `GRU` wrapping the trained Equinox
cell (the same function, plus closed-form Jacobians); `library_cell=False` gives
the bare `eqx.nn` cell instead.
"""

import dataclasses
import importlib
import inspect
import json
import string
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import parallel_rnn as prnn


CACHE = Path("results") / "trained"


# --------------------------------------------------------------------------- AR model


class ARModel(eqx.Module):
    """An autoregressive GRU/LSTM with a 2-output (mean, scale) linear decoder."""

    cell: eqx.Module
    decoder: eqx.nn.Linear

    def __init__(self, kind: str, hidden: int, *, key):
        kc, kd = jax.random.split(key)
        cls = {"gru": eqx.nn.GRUCell, "lstm": eqx.nn.LSTMCell}[kind]
        self.cell = cls(1, hidden, key=kc)
        self.decoder = eqx.nn.Linear(hidden, 2, key=kd)

    @property
    def is_lstm(self) -> bool:
        return isinstance(self.cell, eqx.nn.LSTMCell)

    def init_hidden(self, dtype=jnp.float32):
        h = jnp.zeros(self.cell.hidden_size, dtype)
        return (h, h) if self.is_lstm else h

    def head(self, y_prev, hidden):
        """Mean and scale of `y_t` given `y_{t-1}` and the new hidden state."""
        h = hidden[0] if self.is_lstm else hidden
        d = self.decoder(h)
        return y_prev + d[0], jax.nn.softplus(d[1])


class ARCell(eqx.Module):
    """`ARModel` as a recurrence: state `[y_{t-1}, hidden]` (flat), input the noise `(1,)`."""

    model: ARModel

    def __call__(self, x_t, s):
        m = self.model
        H = m.cell.hidden_size
        y = s[0]
        hidden = (s[1 : 1 + H], s[1 + H :]) if m.is_lstm else s[1:]
        hidden = m.cell(y[None], hidden)
        mean, scale = m.head(y, hidden)
        y_new = mean + scale * x_t[0]
        flat = jnp.concatenate(hidden) if m.is_lstm else hidden
        return jnp.concatenate([y_new[None], flat])


def sine_data(key, batch: int, length: int, period: float = 50.0, noise: float = 0.1):
    """Noisy sine waves `(batch, length)`: `sin(2π t / period + φ) + noise · ε`, random φ."""
    kp, kn = jax.random.split(key)
    phase = jax.random.uniform(kp, (batch, 1), maxval=2 * np.pi)
    t = jnp.arange(length)[None, :]
    return jnp.sin(2 * np.pi * t / period + phase) + noise * jax.random.normal(kn, (batch, length))


def sequential_hidden(cell, inputs, h0):
    """BPTT: the hidden states by `lax.scan` (`prnn.solve_sequential`)."""
    return prnn.solve_sequential(cell, inputs, h0)


def ar_loss(model: ARModel, ys, hidden_fn: Callable = sequential_hidden):
    """Mean Gaussian NLL of `ys[:, 1:]` given `ys[:, :-1]` (teacher forcing).

    `hidden_fn(cell, inputs (L, 1), h0) -> hidden states` evaluates the recurrence:
    `solve_sequential` (BPTT) or a `solve_parallel` call (exact adjoint gradients).
    """

    def one(y):
        hidden = hidden_fn(model.cell, y[:-1, None], model.init_hidden(y.dtype))
        mean, scale = jax.vmap(model.head)(y[:-1], hidden)
        z = (y[1:] - mean) / scale
        return jnp.mean(jnp.log(scale) + 0.5 * z**2 + 0.5 * np.log(2 * np.pi))

    return jnp.mean(jax.vmap(one)(ys))


def train_ar(
    kind: str,
    hidden: int,
    seed: int,
    steps: int,
    *,
    batch: int = 16,
    length: int = 256,
    lr: float = 1e-2,
    hidden_fn: Callable = sequential_hidden,
    log: Callable | None = None,
) -> tuple[ARModel, list[float]]:
    """Train an `ARModel` with Adam on fresh noisy sine batches; returns it and its losses.

    The data (`steps` batches) and the initialisation depend only on `seed`, so two
    calls with different `hidden_fn` see the same problem.
    """
    key_model, key_data = jax.random.split(jax.random.key(seed))
    model = ARModel(kind, hidden, key=key_model)
    opt = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adam(optax.cosine_decay_schedule(lr, steps, 0.1))
    )
    state = opt.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, state, ys):
        loss, grads = eqx.filter_value_and_grad(ar_loss)(model, ys, hidden_fn)
        updates, state = opt.update(grads, state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), state, loss

    losses = []
    for i, k in enumerate(jax.random.split(key_data, steps)):
        model, state, loss = step(model, state, sine_data(k, batch, length))
        losses.append(float(loss))
        if log is not None and (i % 100 == 0 or i == steps - 1):
            log(f"  step {i:5d}  nll {losses[-1]:.4f}")
    return model, losses


# --------------------------------------------------------------------------- char LM

CORPUS_MODULES = (
    "collections", "functools", "itertools", "json", "pathlib", "re", "string", "textwrap",
    "argparse", "logging", "subprocess", "threading", "unittest", "dataclasses", "statistics",
    "random", "heapq", "csv", "shutil", "tempfile", "zipfile", "contextlib", "abc", "enum",
    "copy", "pickle", "io", "sched", "difflib", "configparser", "optparse", "urllib.parse",
    "http.client", "email.message", "typing", "inspect", "doctest",
)  # fmt: skip
VOCAB = "\n" + string.printable[:95]  # printable ASCII: digits, letters, punctuation, space
TRAIN_CHARS = 60_000
HELD_OUT_CHARS = 20_000


def corpus() -> str:
    """Docstrings of `CORPUS_MODULES` and their public classes and functions, in a fixed
    order, each distinct docstring once, reduced to `VOCAB` (other characters dropped)."""
    parts = []
    with warnings.catch_warnings():  # deprecated aliases (typing.io) warn on access
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in CORPUS_MODULES:
            mod = importlib.import_module(name)
            parts.append(inspect.getdoc(mod) or "")
            for member in sorted(dir(mod)):
                obj = getattr(mod, member)
                if member.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                    continue
                parts.append(inspect.getdoc(obj) or "")
    # `getdoc` inherits docstrings, so many classes repeat their base's: keep each once.
    text = "\n\n".join(dict.fromkeys(p for p in parts if p)).replace("\t", "    ")
    keep = set(VOCAB)
    return "".join(c for c in text if c in keep)


def corpus_ids() -> tuple[np.ndarray, np.ndarray]:
    """Training and held-out character ids (`TRAIN_CHARS`, `HELD_OUT_CHARS`)."""
    text = corpus()
    need = TRAIN_CHARS + HELD_OUT_CHARS
    if len(text) < need:
        raise RuntimeError(f"corpus has {len(text)} characters, need {need}")
    index = {c: i for i, c in enumerate(VOCAB)}
    ids = np.array([index[c] for c in text[:need]], np.int32)
    return ids[:TRAIN_CHARS], ids[TRAIN_CHARS:]


class CharLM(eqx.Module):
    """Embedding (16) → LSTM/GRU → linear decoder to logits over `VOCAB`."""

    embed: eqx.nn.Embedding
    cell: eqx.Module
    decoder: eqx.nn.Linear

    def __init__(self, kind: str, hidden: int, embed: int = 16, *, key):
        ke, kc, kd = jax.random.split(key, 3)
        cls = {"gru": eqx.nn.GRUCell, "lstm": eqx.nn.LSTMCell}[kind]
        self.embed = eqx.nn.Embedding(len(VOCAB), embed, key=ke)
        self.cell = cls(embed, hidden, key=kc)
        self.decoder = eqx.nn.Linear(hidden, len(VOCAB), key=kd)

    @property
    def is_lstm(self) -> bool:
        return isinstance(self.cell, eqx.nn.LSTMCell)

    def init_state(self, dtype=None):
        dtype = self.cell.weight_hh.dtype if dtype is None else dtype
        h = jnp.zeros(self.cell.hidden_size, dtype)
        return (h, h) if self.is_lstm else h

    def logits(self, states):
        h = states[0] if self.is_lstm else states
        return jax.vmap(self.decoder)(h)


def lm_loss(model: CharLM, ids, hidden_fn: Callable = sequential_hidden):
    """Mean cross-entropy (nats/char) of `ids[:, 1:]` given `ids[:, :-1]`, zero state."""

    def one(seq):
        xs = jax.vmap(model.embed)(seq[:-1])
        states = hidden_fn(model.cell, xs, model.init_state())
        return optax.softmax_cross_entropy_with_integer_labels(model.logits(states), seq[1:])

    return jnp.mean(jax.vmap(one)(ids))


def train_lm(
    kind: str,
    hidden: int,
    seed: int,
    steps: int,
    *,
    batch: int = 32,
    length: int = 128,
    lr: float = 1e-2,
    embed: int = 16,
    log: Callable | None = None,
) -> tuple[CharLM, list[float]]:
    """Train a `CharLM` with Adam (BPTT) on random windows of the training text."""
    train_ids, held_out = corpus_ids()
    key_model, key_data = jax.random.split(jax.random.key(seed))
    model = CharLM(kind, hidden, embed, key=key_model)
    opt = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adam(optax.cosine_decay_schedule(lr, steps, 0.05))
    )
    state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    data = jnp.asarray(train_ids)

    @eqx.filter_jit
    def step(model, state, key):
        starts = jax.random.randint(key, (batch,), 0, len(train_ids) - length - 1)
        ids = jax.vmap(lambda s: jax.lax.dynamic_slice(data, (s,), (length + 1,)))(starts)
        loss, grads = eqx.filter_value_and_grad(lm_loss)(model, ids)
        updates, state = opt.update(grads, state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), state, loss

    losses = []
    for i, k in enumerate(jax.random.split(key_data, steps)):
        model, state, loss = step(model, state, k)
        losses.append(float(loss))
        if log is not None and (i % 100 == 0 or i == steps - 1):
            log(f"  step {i:5d}  loss {losses[-1]:.4f} nats/char")
    return model, losses


# --------------------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True)
class Case:
    family: str  # "ar" or "lm"
    kind: str  # "gru" or "lstm"
    hidden: int
    quick_steps: int
    full_steps: int
    default_T: int
    embed: int = 16  # LMs only


CASES = {
    "ar_gru3": Case("ar", "gru", 3, 1500, 5000, 9999),
    "ar_gru16": Case("ar", "gru", 16, 1500, 5000, 9999),
    "ar_lstm": Case("ar", "lstm", 8, 1500, 5000, 9999),
    "char_lstm": Case("lm", "lstm", 64, 1000, 6000, 2000),
    "char_gru": Case("lm", "gru", 128, 1000, 6000, 2000),
    # The small LM shipped with the tests (tests/data/, `python -m experiments.make_test_data`).
    "char_lstm_small": Case("lm", "lstm", 24, 1000, 3000, 1000, embed=8),
}


def _skeleton(case: Case, seed: int):
    key = jax.random.split(jax.random.key(seed))[0]  # the key the trainers initialise with
    if case.family == "ar":
        return ARModel(case.kind, case.hidden, key=key)
    return CharLM(case.kind, case.hidden, case.embed, key=key)


def load_model(
    name: str,
    *,
    quick: bool = True,
    seed: int = 0,
    steps: int | None = None,
    cache: Path = CACHE,
    verbose: bool = True,
):
    """The trained model of case `name` and its training record (trains and caches if
    missing). `steps` overrides the number of training steps of `quick` (tests)."""
    if name not in CASES:
        raise ValueError(f"unknown case {name!r}; choose from {sorted(CASES)}")
    case = CASES[name]
    mode = f"{steps}steps" if steps is not None else "quick" if quick else "full"
    stem = Path(cache) / f"{name}_seed{seed}_{mode}"
    weights, record = stem.with_suffix(".eqx"), stem.with_suffix(".json")
    skeleton = _skeleton(case, seed)
    if weights.exists() and record.exists():
        return eqx.tree_deserialise_leaves(weights, skeleton), json.loads(record.read_text())
    if steps is None:
        steps = case.quick_steps if quick else case.full_steps
    log = print if verbose else None
    if verbose:
        print(f"training {name} (seed {seed}, {steps} steps); cached in {weights}")
    t0 = time.perf_counter()
    if case.family == "ar":
        model, losses = train_ar(case.kind, case.hidden, seed, steps, log=log)
    else:
        model, losses = train_lm(case.kind, case.hidden, seed, steps, embed=case.embed, log=log)
    info = {
        "name": name,
        "seed": seed,
        "quick": quick,
        "steps": steps,
        "train_seconds": time.perf_counter() - t0,
        "final_loss": float(np.mean(losses[-20:])),
        "losses": losses,
    }
    if case.family == "lm":
        info["held_out_loss"] = float(
            eqx.filter_jit(lm_loss)(model, jnp.asarray(corpus_ids()[1][:2001])[None])
        )
    stem.parent.mkdir(parents=True, exist_ok=True)
    eqx.tree_serialise_leaves(weights, model)
    record.write_text(json.dumps(info))
    return model, info


def _cast(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, tree)


def load_case(
    name: str,
    T: int | None = None,
    quick: bool = True,
    *,
    seed: int = 0,
    dtype=jnp.float32,
    library_cell: bool = True,
    steps: int | None = None,
    cache: Path = CACHE,
    verbose: bool = True,
):
    """`(cell, xs, s0, meta)` of a trained case, ready for `prnn.solve_parallel(cell, xs, s0)`.

    - `T`: sequence length (default 9999 for the AR cases, 2000 for the LMs; at most
      `HELD_OUT_CHARS - 1` for the LMs).
    - `quick`: the quickly trained weights (about a minute on a CPU) or the full ones.
    - `seed`: model initialisation and training data; also the AR evaluation noise.
    - `dtype`: the weights and inputs are cast to it (train in float32, evaluate in
      float64 with `jnp.float64` under `jax_enable_x64`).
    - `steps`: train for this many steps instead (cached separately; for smoke tests).
    - `cache`: the weight folder (default `results/trained`).

    `meta` holds `name`, `family`, `D`, `hidden`, `T`, `seed`, the training record
    (`final_loss`, `losses`, `train_seconds`, and `held_out_loss` for the LMs), the
    trained `model` and, for the LMs, the held-out character ids `tokens` (`T + 1`:
    `tokens[t + 1]` is the target after reading `tokens[t]`).
    """
    case = CASES.get(name)
    if case is None:
        raise ValueError(f"unknown case {name!r}; choose from {sorted(CASES)}")
    T = case.default_T if T is None else int(T)
    model, info = load_model(
        name, quick=quick, seed=seed, steps=steps, cache=cache, verbose=verbose
    )
    model = _cast(model, dtype)
    meta = {k: v for k, v in info.items()}
    meta.update(name=name, family=case.family, hidden=case.hidden, T=T, seed=seed, model=model)
    if case.family == "ar":
        cell = ARCell(model)
        xs = jax.random.normal(jax.random.key(10_000 + seed), (T, 1), dtype)
        D = 1 + case.hidden * (2 if case.kind == "lstm" else 1)
        s0 = jnp.zeros(D, dtype)
    else:
        held_out = corpus_ids()[1]
        if T + 1 > len(held_out):
            raise ValueError(f"T={T} exceeds the held-out text ({len(held_out) - 1} characters)")
        tokens = jnp.asarray(held_out[: T + 1])
        xs = jax.vmap(model.embed)(tokens[:-1])
        cell = model.cell
        if library_cell:
            cell = (prnn.cells.LSTM if model.is_lstm else prnn.cells.GRU).wrap(cell)
        s0 = model.init_state(dtype)
        D = case.hidden * (2 if model.is_lstm else 1)
        meta["tokens"] = tokens
    meta["D"] = D
    return cell, xs, s0, meta


def main():
    import argparse

    p = argparse.ArgumentParser(description="Train (or load) and summarise the trained cases.")
    p.add_argument("names", nargs="*", default=list(CASES))
    p.add_argument("--full", action="store_true", help="full training (default: quick)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    for name in args.names:
        cell, xs, s0, meta = load_case(name, quick=not args.full, seed=args.seed)
        states = prnn.solve_sequential(cell, xs, s0)
        lle = prnn.lyapunov_exponent(cell, xs, states, s0, key=jax.random.key(0))
        extra = f" held-out {meta['held_out_loss']:.3f}" if "held_out_loss" in meta else ""
        print(
            f"{name}: D={meta['D']} T={meta['T']} loss {meta['final_loss']:.3f}{extra}"
            f" trained in {meta['train_seconds']:.0f}s, LLE {float(lle):.4f}"
        )


if __name__ == "__main__":
    main()
