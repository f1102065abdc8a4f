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


B, T, M, D = 4, 12, 3, 6
LENGTHS = np.array([12, 7, 1, 0])  # full, padded, one step, all padding


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


_ORACLES = {}


def oracle_loss_and_grads(cells, x, lengths, direction, weight, *, cache_key=None):
    """The scan model's loss, outputs, states and gradients; with `cache_key`, computed
    once per key (tests that share a model, inputs and weights share its compilation)."""
    if cache_key is not None:
        if cache_key not in _ORACLES:
            _ORACLES[cache_key] = oracle_loss_and_grads(cells, x, lengths, direction, weight)
        return _ORACLES[cache_key]

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
    # "ignore": these solves converge (asserted below); the fallback's branch, which
    # only adds compilation here, has its own test.
    layer = make_layer(kind, solver, direction, dtype, on_failure="ignore")
    x = jax.random.normal(jax.random.key(1), (B, T, M), dtype)
    width = 2 * D if direction == "bidirectional" else D
    weight = jax.random.normal(jax.random.key(2), (B, T, width), dtype)
    lengths = jnp.asarray(LENGTHS)
    value, y, result, g_layer, g_x = layer_loss_and_grads(layer, x, lengths, weight)
    o_value, o_y, o_states, o_g_cells, o_g_x = oracle_loss_and_grads(
        layer_cells(layer), x, LENGTHS, direction, weight, cache_key=(kind, direction, dtype)
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
    one = layer(x[0], init_state=jnp.full(D, 0.3))  # (T, M), no lengths
    return vmapped, one


def test_unbatched_and_user_vmap():
    """`jax.vmap` over the unbatched layer with traced scalar `int8` lengths equals the
    scan model, with `T` = 140 > 127 (an `int8` step index `arange(T)` cannot be
    formed: the layer used to raise `OverflowError` there); so does one unpadded
    `(T, M)` sequence from a given initial state. A traced negative length raises
    at run time."""
    layer = make_rnn("eqx_gru", prnn.DEER(), jnp.float64, reverse=True, on_failure="ignore")
    lengths = np.array([127, 7, 1, 0])
    x = jax.random.normal(jax.random.key(1), (B, 140, M))
    (y_v, r_v), (y1, r1) = _unbatched_and_vmapped(layer, x, jnp.asarray(lengths, jnp.int8))
    o_y, _ = oracle_direction(layer.cell, x, lengths, True)
    _close(y_v, o_y, _tol(jnp.float64))
    assert r_v.num_steps.shape == (B,) and np.all(r_v.converged)
    ref = scan_reference(layer.cell, x[0][::-1], jnp.full(D, 0.3))[::-1]
    _close(y1, ref, _tol(jnp.float64))
    assert r1.num_steps.shape == ()
    with pytest.raises(Exception, match="lengths"):
        _unbatched_and_vmapped(layer, x, jnp.array([3, -1, 1, 0], jnp.int8))


POLICY_LAYERS = {
    p: make_rnn("gru", prnn.DEER(), jnp.float64, max_steps=1, on_failure=p)
    for p in ("fallback", "raise", "ignore")
}


def test_fallback_policy():
    """`max_steps=1` cannot converge on the long sequences: they are recomputed exactly
    (states and gradients of the scan model) and flagged; the length-1 and length-0 sequences
    converge within one step and keep their parallel solutions."""
    layer = POLICY_LAYERS["fallback"]
    x = jax.random.normal(jax.random.key(1), (B, T, M))
    weight = jax.random.normal(jax.random.key(2), (B, T, D))
    value, y, result, g_layer, g_x = layer_loss_and_grads(layer, x, jnp.asarray(LENGTHS), weight)
    # The model, inputs and weights of the first padded-batch case: its oracle is shared.
    o_value, o_y, _, o_g_cells, o_g_x = oracle_loss_and_grads(
        (layer.cell,), x, LENGTHS, "forward", weight, cache_key=("gru", "forward", jnp.float64)
    )
    tol = _tol(jnp.float64)
    _close(y, o_y, tol)
    _close(layer_cells(g_layer), o_g_cells, tol)
    _close(g_x, o_g_x, tol)
    assert list(result.converged) == [False, False, True, True]
    assert list(result.fell_back) == [True, True, False, False]


def test_raise_and_ignore_policies():
    """`"raise"` raises at run time; `"ignore"` returns the unconverged iterate, flagged."""
    x = jax.random.normal(jax.random.key(1), (B, T, M))
    lengths = jnp.asarray(LENGTHS)
    with pytest.raises(Exception, match="max_steps"):
        eqx.filter_jit(POLICY_LAYERS["raise"])(x, lengths=lengths)
    y, result = eqx.filter_jit(POLICY_LAYERS["ignore"])(x, lengths=lengths)
    assert list(result.converged) == [False, False, True, True]
    assert not np.any(result.fell_back)
    # The returned iterate is not the recurrence's solution: one cell step off it
    # (computed here, not by the solve) is far from it on the full-length sequence.
    cell, s = POLICY_LAYERS["ignore"].cell, result.states[0]
    previous = jnp.concatenate([jnp.zeros((1, D)), s[:-1]])
    assert np.max(np.abs(s - jax.vmap(cell)(x[0], previous))) > 1e-6


def make_stack(dtype):
    k = jax.random.split(jax.random.key(4), 6)
    W = 5
    first = nn.Block(
        nn.RNN(
            prnn.cells.GRU.wrap(eqx.nn.GRUCell(W, D, key=k[0], dtype=dtype)),
            prnn.QuasiDEER(),
            on_failure="ignore",
        ),
        W,
        key=k[1],
        norm="rms",
        dropout=0.5,
    )
    elman = nn.RNN(prnn.cells.Elman(W, D, key=k[2], dtype=dtype), reverse=True, on_failure="ignore")
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
    dropout asks for its key before a solve is traced."""
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
    assert all(np.all(r.converged) for r in results)
    guesses = [r.states for r in results]
    (value2, (_, results2)), _ = _stack_loss_and_grads(stack, x, lengths, weight, guesses)
    _close(value2, value, tol)
    assert all(np.all(r.num_steps == 0) for r in results2)
    with pytest.raises(RuntimeError, match="key"):
        stack(x, lengths=lengths)


def test_trace_time_errors():
    layer = make_rnn("gru", prnn.DEER(), jnp.float64)
    x = jnp.zeros((B, T, M))
    with pytest.raises(ValueError, match=r"\(T, M\)"):
        layer(x[0, 0])
    with pytest.raises(ValueError, match=r"lengths.*\(4,\)"):
        layer(x, lengths=jnp.array([1, 2]))
    with pytest.raises(ValueError, match="on_failure"):
        nn.RNN(layer.cell, on_failure="retry")  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="reverse"):
        nn.Bidirectional(layer, layer)
    bi = nn.Bidirectional(layer, make_rnn("gru", prnn.DEER(), jnp.float64, reverse=True))
    with pytest.raises(ValueError, match="guess.*pair"):
        bi(x, guess=jnp.zeros((B, T, D)))  # pyright: ignore[reportArgumentType]
    with pytest.raises(TypeError, match="init_state"):
        nn.RNN(lambda x, s: s)(x)
    with pytest.raises(ValueError, match=r"inputs.*one step"):
        layer(x[:, :0])
    for bad in ([1, 2, 3, T + 1], [1, -1, 3, 4]):
        with pytest.raises(ValueError, match=r"lengths.*\[0, 12\]"):
            layer(x, lengths=jnp.array(bad))
    with pytest.raises(ValueError, match=r"init_state.*\(4, 6\).*\(6,\)"):
        layer(x, init_state=jnp.zeros(D))  # one state for the whole batch
    with pytest.raises(ValueError, match=r"guess.*\(4, 12\).*\(12, 6\)"):
        layer(x, guess=jnp.zeros((T, D)))  # one sequence's trajectory for a batch


def test_shapes_and_dtypes_traced():
    """Traced only: integer inputs are cast to the parameters' dtype; a readout with a
    scalar per step gives `(B, T)` outputs, zero-padded without broadcasting."""
    layer = make_rnn("gru", prnn.DEER(), jnp.float32, readout=lambda s: s[0], on_failure="ignore")
    lengths = jnp.asarray(LENGTHS)
    y, r = eqx.filter_eval_shape(lambda x: layer(x, lengths=lengths), jnp.zeros((B, T, M), int))
    assert (y.shape, y.dtype, r.states.dtype) == ((B, T), jnp.float32, jnp.float32)


class _Registered(_Plain):
    """`_Plain` whose closed-form Jacobian comes from the registry."""


def test_mask_follows_the_inner_registration_and_registers_nothing():
    """The masked cell's closed form is the inner cell's registered one on valid steps
    and the identity on padding; a new registration reaches it (and changes its tree
    structure, so solves compile again); the mask adds nothing to the global registry."""
    from parallel_rnn._structure import _REGISTRY, jacobian_rule
    from parallel_rnn.nn._mask import masked

    def exact(c, x, s):
        v = c(x, s)
        return v, (1 - v**2)[:, None] * c.u

    def zero(c, x, s):
        return c(x, s), jnp.zeros_like(c.u)

    # _Plain's __init__ (pyright reads the subclass as a dataclass of its fields).
    cell = _Registered(M, D, key=jax.random.key(0), dtype=jnp.float64)  # pyright: ignore[reportCallIssue]
    x, s = jnp.linspace(-1, 1, M), jnp.linspace(0.5, -0.5, D)
    structures = []
    for f in (exact, zero):
        prnn.register_jacobian(_Registered, value_and_jacobian=f)
        before = dict(_REGISTRY)
        m = masked(cell)
        assert _REGISTRY == before
        structures.append(jax.tree_util.tree_structure(m))
        form = jacobian_rule(m).value_and_jacobian
        assert form is not None
        value, jac = form(m, (x, jnp.array(True)), s)
        _close((value, jac), f(cell, x, s), _tol(jnp.float64))
        value, jac = form(m, (x, jnp.array(False)), s)
        _close((value, jac), (s, jnp.eye(D)), _tol(jnp.float64))
    assert structures[0] != structures[1]
