"""`parallel_rnn.nn` against hand-written `lax.scan` models.

The oracles run each sequence of a padded batch on its own valid prefix only
(sliced with its concrete length), reversed for the reverse direction, so that
they share nothing with the layers' masking. Sizes are tiny and each case
compiles one jitted value-and-gradient function.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import parallel_rnn as prnn
from parallel_rnn import nn

from .helpers import scan_reference


B, T, M, D = 3, 12, 3, 4
LENGTHS = np.array([12, 7, 1])


class _Plain(eqx.Module):
    """A cell with no closed-form Jacobian (the layers' mask must fall back to autodiff)."""

    w: jax.Array
    u: jax.Array
    hidden_size: int = eqx.field(static=True)

    def __init__(self, m, d, *, key, dtype):
        k1, k2 = jax.random.split(key)
        self.w = jax.random.normal(k1, (d, m), dtype) / np.sqrt(m)
        self.u = 0.8 * jax.random.normal(k2, (d, d), dtype) / np.sqrt(d)
        self.hidden_size = d

    def __call__(self, x, s):
        return jnp.tanh(self.w @ x + self.u @ s)


def _cell(kind, key, dtype):
    if kind == "gru":
        return prnn.cells.GRU.wrap(eqx.nn.GRUCell(M, D, key=key, dtype=dtype))
    if kind == "lstm":
        return prnn.cells.LSTM.wrap(eqx.nn.LSTMCell(M, D, key=key, dtype=dtype))
    if kind == "eqx_gru":
        return eqx.nn.GRUCell(M, D, key=key, dtype=dtype)
    return _Plain(M, D, key=key, dtype=dtype)


def _zeros(cell, dtype):
    z = jnp.zeros(D, dtype)
    return (z, z) if isinstance(cell, (prnn.cells.LSTM, eqx.nn.LSTMCell)) else z


def _h(state):
    return state[0] if isinstance(state, tuple) else state


def oracle_direction(cell, x, lengths, reverse):
    """Outputs `(B, T, D)` (zero past each length) and the valid states, per sequence."""
    dtype = x.dtype
    outputs, states = [], []
    for b, L in enumerate(lengths):
        xs = x[b, :L][::-1] if reverse else x[b, :L]
        s = scan_reference(cell, xs, _zeros(cell, dtype))
        if reverse:
            s = jax.tree_util.tree_map(lambda a: a[::-1], s)
        states.append(s)
        h = _h(s)
        outputs.append(jnp.concatenate([h, jnp.zeros((x.shape[1] - L, D), dtype)]))
    return jnp.stack(outputs), states


def oracle_layer(cells, x, lengths, direction):
    if direction == "bidirectional":
        (y_f, s_f), (y_b, s_b) = (
            oracle_direction(cells[0], x, lengths, False),
            oracle_direction(cells[1], x, lengths, True),
        )
        return jnp.concatenate([y_f, y_b], -1), (s_f, s_b)
    return oracle_direction(cells[0], x, lengths, direction == "reverse")


def make_rnn(kind, solver, dtype, *, reverse=False, key=jax.random.key(0), **options) -> nn.RNN:
    return nn.RNN(_cell(kind, key, dtype), solver, reverse=reverse, **options)


def make_layer(kind, solver, direction, dtype, **options) -> nn.RNN | nn.Bidirectional:
    if direction == "bidirectional":
        k1, k2 = jax.random.split(jax.random.key(0))
        return nn.Bidirectional(
            make_rnn(kind, solver, dtype, key=k1, **options),
            make_rnn(kind, solver, dtype, reverse=True, key=k2, **options),
        )
    return make_rnn(kind, solver, dtype, reverse=direction == "reverse", **options)


def layer_cells(layer):
    if isinstance(layer, nn.Bidirectional):
        return (layer.forward.cell, layer.backward.cell)
    return (layer.cell,)


def _loss(y, weight):
    return jnp.sum(weight * y) + 0.5 * jnp.sum(y**2)


@eqx.filter_jit
def layer_loss_and_grads(layer, x, lengths, weight):
    def loss(layer, x):
        y, result = layer(x, lengths=lengths)
        return _loss(y, weight), (y, result)

    (value, (y, result)), (g_layer, g_x) = eqx.filter_value_and_grad(
        lambda lx: loss(*lx), has_aux=True
    )((layer, x))
    return value, y, result, g_layer, g_x


def oracle_loss_and_grads(cells, x, lengths, direction, weight):
    def loss(cells, x):
        y, states = oracle_layer(cells, x, lengths, direction)
        return _loss(y, weight), (y, states)

    (value, (y, states)), (g_cells, g_x) = eqx.filter_jit(
        eqx.filter_value_and_grad(lambda cx: loss(*cx), has_aux=True)
    )((cells, x))
    return value, y, states, g_cells, g_x


def _tol(dtype):
    return dict(rtol=1e-8, atol=1e-10) if dtype == jnp.float64 else dict(rtol=2e-4, atol=2e-5)


def _close(a, b, tol):
    leaves = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda u, v: (u, v), a, b))
    for u, v in zip(leaves[::2], leaves[1::2]):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), **tol)


CASES = [
    # (cell, solver, direction, dtype): every direction, both dtypes, the closed forms
    # (gated/dense and diagonal; blocks via the LSTM) and none; the registry's
    # (eqx.nn.GRUCell) in `test_unbatched_and_user_vmap`.
    ("gru", prnn.DEER(), "forward", jnp.float64),
    ("lstm", prnn.QuasiDEER(), "reverse", jnp.float32),
    ("plain", prnn.DEER(), "bidirectional", jnp.float64),
]


@pytest.mark.parametrize("kind, solver, direction, dtype", CASES)
def test_layer_matches_scan_on_padded_batch(kind, solver, direction, dtype):
    """States, outputs, loss and gradients (parameters, inputs) equal the per-sequence
    `lax.scan` model; padding gets exactly zero gradient and does not change the loss."""
    layer = make_layer(kind, solver, direction, dtype)
    x = jax.random.normal(jax.random.key(1), (B, T, M), dtype)
    width = 2 * D if direction == "bidirectional" else D
    weight = jax.random.normal(jax.random.key(2), (B, T, width), dtype)
    lengths = jnp.asarray(LENGTHS)
    value, y, result, g_layer, g_x = layer_loss_and_grads(layer, x, lengths, weight)
    o_value, o_y, o_states, o_g_cells, o_g_x = oracle_loss_and_grads(
        layer_cells(layer), x, LENGTHS, direction, weight
    )
    tol = _tol(dtype)
    _close(y, o_y, tol)
    _close(value, o_value, tol)
    _close(layer_cells(g_layer), o_g_cells, tol)
    valid = np.arange(T)[None, :] < LENGTHS[:, None]
    _close(np.where(valid[..., None], g_x, 0), o_g_x, tol)
    assert np.all(np.asarray(g_x)[~valid] == 0)
    assert np.all(np.asarray(y)[~valid] == 0)
    # The valid states; past a length the state of the last valid step is held.
    per_direction = result.states if direction == "bidirectional" else (result.states,)
    o_per_direction = o_states if direction == "bidirectional" else (o_states,)
    for states, o_states_d in zip(per_direction, o_per_direction):
        for b, L in enumerate(LENGTHS):
            _close(jax.tree_util.tree_map(lambda a: a[b, :L], states), o_states_d[b], tol)
    flag_shape = (B, 2) if direction == "bidirectional" else (B,)
    assert result.num_steps.shape == flag_shape
    assert np.all(result.converged) and not np.any(result.fell_back)
    # New values in the padding: same loss, bit for bit.
    noise = jax.random.normal(jax.random.key(3), x.shape, dtype)
    x2 = jnp.where(valid[..., None], x, 10 * noise)
    assert layer_loss_and_grads(layer, x2, lengths, weight)[0] == value


@eqx.filter_jit
def _unbatched_and_vmapped(layer, x, lengths):
    vmapped = jax.vmap(lambda xb, L: layer(xb, lengths=L))(x, lengths)
    one = layer(x[0])  # (T, M), no lengths
    return vmapped, one


def test_unbatched_and_user_vmap():
    """`jax.vmap` over the unbatched layer with scalar lengths equals the scan model;
    so does one unpadded `(T, M)` sequence."""
    layer = make_rnn("eqx_gru", prnn.DEER(), jnp.float64, reverse=True)
    x = jax.random.normal(jax.random.key(1), (B, T, M))
    (y_v, r_v), (y1, r1) = _unbatched_and_vmapped(layer, x, jnp.asarray(LENGTHS))
    o_y, _ = oracle_direction(layer.cell, x, LENGTHS, True)
    _close(y_v, o_y, _tol(jnp.float64))
    assert r_v.num_steps.shape == (B,) and np.all(r_v.converged)
    ref = scan_reference(layer.cell, x[0][::-1], jnp.zeros(D))[::-1]
    _close(y1, ref, _tol(jnp.float64))
    assert r1.num_steps.shape == ()


POLICY_LAYERS = {
    p: make_rnn("gru", prnn.DEER(), jnp.float64, max_steps=1, on_failure=p)
    for p in ("fallback", "raise", "ignore")
}


def test_fallback_policy():
    """`max_steps=1` cannot converge on the long sequences: they are recomputed exactly
    (states and gradients of the scan model) and flagged; the length-1 sequence
    converges in one step and keeps its parallel solution."""
    layer = POLICY_LAYERS["fallback"]
    x = jax.random.normal(jax.random.key(1), (B, T, M))
    weight = jax.random.normal(jax.random.key(2), (B, T, D))
    value, y, result, g_layer, g_x = layer_loss_and_grads(layer, x, jnp.asarray(LENGTHS), weight)
    o_value, o_y, _, o_g_cells, o_g_x = oracle_loss_and_grads(
        (layer.cell,), x, LENGTHS, "forward", weight
    )
    tol = _tol(jnp.float64)
    _close(y, o_y, tol)
    _close(layer_cells(g_layer), o_g_cells, tol)
    _close(g_x, o_g_x, tol)
    assert list(result.converged) == [False, False, True]
    assert list(result.fell_back) == [True, True, False]


def test_raise_and_ignore_policies():
    """`"raise"` raises at run time; `"ignore"` returns the unconverged iterate, flagged."""
    x = jax.random.normal(jax.random.key(1), (B, T, M))
    lengths = jnp.asarray(LENGTHS)
    with pytest.raises(Exception, match="max_steps"):
        eqx.filter_jit(POLICY_LAYERS["raise"])(x, lengths=lengths)
    y, result = eqx.filter_jit(POLICY_LAYERS["ignore"])(x, lengths=lengths)
    assert list(result.converged) == [False, False, True]
    assert not np.any(result.fell_back)
    o_y, _ = oracle_direction(POLICY_LAYERS["ignore"].cell, x, LENGTHS, False)
    assert np.max(np.abs(y[0] - o_y[0])) > 1e-6


def make_stack(dtype):
    k = jax.random.split(jax.random.key(4), 6)
    W = 5
    first = nn.Block(
        nn.RNN(prnn.cells.GRU.wrap(eqx.nn.GRUCell(W, D, key=k[0], dtype=dtype)), prnn.QuasiDEER()),
        W,
        key=k[1],
        norm="rms",
        dropout=0.5,
    )
    elman = nn.RNN(prnn.cells.Elman(W, D, key=k[2], dtype=dtype), reverse=True)
    second = nn.Block(elman, W, key=k[3])
    return nn.Stack([first, second])


def oracle_stack(stack, x, lengths):
    """The stack written out: pre-norm, layer (scan model), projection, residual."""
    valid = (np.arange(x.shape[1])[None, :] < lengths[:, None])[..., None]
    for block in stack.blocks:
        h = jax.vmap(jax.vmap(block.norm))(x)
        layer = block.layer
        h, _ = oracle_direction(layer.cell, h, lengths, layer.reverse)
        x = jnp.where(valid, x + jax.vmap(jax.vmap(block.projection))(h), 0)
    return x


@eqx.filter_jit
def _stack_loss_and_grads(stack, x, lengths, weight, guesses):
    def loss(stack, x):
        y, results = stack(x, lengths=lengths, guesses=guesses, inference=True)
        return _loss(y, weight), (y, results)

    return eqx.filter_value_and_grad(lambda sx: loss(*sx), has_aux=True)((stack, x))


def test_stack_matches_scan_model():
    """A two-block stack (RMSNorm + GRU; LayerNorm + reverse Elman) equals the
    same model written with `lax.scan`, in outputs and gradients, on a padded batch;
    its results fed back as warm starts give the same loss with no iterations;
    dropout asks for its key."""
    stack = make_stack(jnp.float64)
    x = jax.random.normal(jax.random.key(1), (B, T, 5))
    weight = jax.random.normal(jax.random.key(2), (B, T, 5))
    lengths = jnp.asarray(LENGTHS)
    # Zeros are the default guess (the zero initial state repeated); passing them
    # keeps one compiled function for both calls.
    zeros = [jnp.zeros((B, T, D)), jnp.zeros((B, T, D))]
    (value, (y, results)), (g_stack, g_x) = _stack_loss_and_grads(stack, x, lengths, weight, zeros)

    def oracle_loss(sx):
        return _loss(oracle_stack(sx[0], sx[1], LENGTHS), weight)

    o_value, (o_g_stack, o_g_x) = eqx.filter_jit(eqx.filter_value_and_grad(oracle_loss))((stack, x))
    tol = _tol(jnp.float64)
    _close(value, o_value, tol)
    _close(eqx.filter(g_stack, eqx.is_array), eqx.filter(o_g_stack, eqx.is_array), tol)
    _close(g_x, o_g_x, tol)
    valid = np.arange(T)[None, :] < LENGTHS[:, None]
    assert np.all(np.asarray(g_x)[~valid] == 0) and np.all(np.asarray(y)[~valid] == 0)
    assert [r.num_steps.shape for r in results] == [(B,), (B,)]
    guesses = [r.states for r in results]
    (value2, (_, results2)), _ = _stack_loss_and_grads(stack, x, lengths, weight, guesses)
    _close(value2, value, tol)
    assert all(np.all(r.num_steps == 0) for r in results2)
    with pytest.raises(RuntimeError, match="key"):
        eqx.filter_eval_shape(lambda s, x: s(x, lengths=lengths), stack, x)


def test_trace_time_errors():
    layer = make_rnn("gru", prnn.DEER(), jnp.float64)
    x = jnp.zeros((B, T, M))
    with pytest.raises(ValueError, match=r"\(T, M\)"):
        layer(x[0, 0])
    with pytest.raises(ValueError, match=r"lengths.*\(3,\)"):
        layer(x, lengths=jnp.array([1, 2]))
    with pytest.raises(ValueError, match="on_failure"):
        nn.RNN(layer.cell, on_failure="retry")  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="reverse"):
        nn.Bidirectional(layer, layer)
    with pytest.raises(TypeError, match="init_state"):
        nn.RNN(lambda x, s: s)(x)
