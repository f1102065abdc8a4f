"""Structured Jacobians: the registry, Equinox's cells, block scans, ParaRNN cells."""

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import parallel_rnn as prnn
from parallel_rnn import cells
from parallel_rnn._gated import step_products
from parallel_rnn._scan import block_recurrence, linear_recurrence, transposed_recurrence
from parallel_rnn._structure import (
    blocks_to_diagonal,
    dense_to_blocks,
    jacobian_rule,
    registered_rule,
)

from .helpers import max_abs_diff, scan_reference


jax.config.update("jax_enable_x64", True)

M = 3


def _flat_jacobian(cell, x, state):
    flat, unravel = jax.flatten_util.ravel_pytree(state)
    return jax.jacfwd(lambda s: jax.flatten_util.ravel_pytree(cell(x, unravel(s)))[0])(flat)


def _blocks_as_dense(blocks):
    """`(n, k, k)` blocks (strided layout) -> the `(D, D)` matrix they stand for."""
    n, k, _ = blocks.shape
    eye = jnp.eye(n, dtype=blocks.dtype)
    # J[a n + j, b n + l] = blocks[j, a, b] δ_jl
    return jnp.einsum("jab,jl->ajbl", blocks, eye).reshape(n * k, n * k)


def _point(state_fn, key):
    k1, k2 = jax.random.split(key)
    x = jax.random.normal(k1, (M,), jnp.float64)
    return x, state_fn(k2)


def _gru(hidden):
    return (
        lambda: eqx.nn.GRUCell(M, hidden, key=jax.random.key(0), dtype=jnp.float64),
        lambda k: jax.random.normal(k, (hidden,), jnp.float64),
    )


def _lstm(hidden):
    return (
        lambda: eqx.nn.LSTMCell(M, hidden, key=jax.random.key(1), dtype=jnp.float64),
        lambda k: tuple(jax.random.normal(k, (2, hidden), jnp.float64)),
    )


# The closed forms write the recurrent product one way below `D = 32` and the
# other from 32 on (`cells._rnn._recurrent`): both sizes are checked.
_EQX = {"gru": _gru(5), "lstm": _lstm(4), "gru-wide": _gru(32), "lstm-wide": _lstm(32)}


@pytest.mark.parametrize("kind", sorted(_EQX))
def test_equinox_cells_closed_forms_equal_jacfwd(kind):
    make, state_fn = _EQX[kind]
    cell = make()
    rule = jacobian_rule(cell)
    assert rule.value_and_diagonal is not None and rule.value_and_jacobian is not None

    @jax.jit
    def evaluate(x, s):
        # Eagerly each small op would dispatch (and compile) on its own.
        out = dict(
            J=_flat_jacobian(cell, x, s),
            value=cell(x, s),
            dense=rule.value_and_jacobian(cell, x, s),
            diag=rule.value_and_diagonal(cell, x, s),
        )
        if kind.startswith("lstm"):
            out["blocks"] = rule.value_and_blocks(cell, x, s)
        return out

    for key in jax.random.split(jax.random.key(7), 3):
        out = evaluate(*_point(state_fn, key))
        J = out["J"]
        for name in ("dense", "diag") + (("blocks",) if kind.startswith("lstm") else ()):
            assert max_abs_diff(out[name][0], out["value"]) < 1e-12
        np.testing.assert_allclose(out["dense"][1], J, atol=1e-12, rtol=0)
        flat_diag = jax.flatten_util.ravel_pytree(out["diag"][1])[0]
        np.testing.assert_allclose(flat_diag, jnp.diag(J), atol=1e-12, rtol=0)
        if kind.startswith("lstm"):
            np.testing.assert_allclose(out["blocks"][1], dense_to_blocks(J, 2), atol=1e-12, rtol=0)


_PARA = {
    "ParaGRU": (
        lambda: cells.ParaGRU(M, 5, key=jax.random.key(2)),
        lambda k: jax.random.normal(k, (5,), jnp.float64),
    ),
    "ParaLSTM": (
        lambda: cells.ParaLSTM(M, 4, key=jax.random.key(3)),
        lambda k: tuple(jax.random.normal(k, (2, 4), jnp.float64)),
    ),
}


@pytest.mark.parametrize("name", sorted(_PARA))
def test_pararnn_cells_jacobian_is_exactly_their_declared_structure(name):
    make, state_fn = _PARA[name]
    cell = make()

    @jax.jit
    def evaluate(x, s):
        if name == "ParaGRU":
            value, diag = cell.value_and_diagonal_jacobian(x, s)
            structured = jnp.diag(diag)
        else:
            value, blocks = cell.value_and_block_jacobian(x, s)
            structured = _blocks_as_dense(blocks)
        flat_diag = jax.flatten_util.ravel_pytree(cell.diagonal_jacobian(x, s))[0]
        return _flat_jacobian(cell, x, s), structured, flat_diag, value, cell(x, s)

    for key in jax.random.split(jax.random.key(8), 3):
        J, structured, diag, value, want = evaluate(*_point(state_fn, key))
        np.testing.assert_allclose(structured, J, atol=1e-12, rtol=0)
        np.testing.assert_allclose(diag, jnp.diag(J), atol=1e-12, rtol=0)
        assert max_abs_diff(value, want) < 1e-15


def test_block_helpers_agree_with_dense_layout():
    blocks = jax.random.normal(jax.random.key(4), (5, 3, 3))
    dense = _blocks_as_dense(blocks)
    np.testing.assert_array_equal(dense_to_blocks(dense, 3), blocks)
    np.testing.assert_array_equal(blocks_to_diagonal(blocks), jnp.diag(dense))


def _block_bidiagonal_solve(A_dense, b, reverse):
    """Solve the recurrence as one dense `(T D) × (T D)` lower/upper block-bidiagonal system."""
    T, D = b.shape
    A_dense, L = np.asarray(A_dense), np.eye(T * D)
    for t in range(1, T):
        if reverse:  # x_t - A_t x_{t+1} = b_t
            L[(t - 1) * D : t * D, t * D : (t + 1) * D] = -A_dense[t - 1]
        else:  # x_t - A_t x_{t-1} = b_t
            L[t * D : (t + 1) * D, (t - 1) * D : t * D] = -A_dense[t]
    return np.linalg.solve(L, np.asarray(b).reshape(-1)).reshape(T, D)


@pytest.mark.parametrize(
    "method, reverse, k",
    [
        ("sequential", False, 2),
        ("sequential", True, 1),
        ("associative", False, 3),
        ("associative", True, 2),
    ],
)
def test_block_recurrence_equals_dense_block_bidiagonal_solve(method, reverse, k):
    T, n = 9, 4
    ka, kb = jax.random.split(jax.random.key(5))
    A = 0.6 * jax.random.normal(ka, (T, n, k, k), jnp.float64)
    b = jax.random.normal(kb, (T, n * k), jnp.float64)
    A_dense = jax.vmap(_blocks_as_dense)(A)
    want = _block_bidiagonal_solve(A_dense, b, reverse)

    @jax.jit
    def run(A, b):
        # Blocks, the dispatcher, and the transposed (adjoint) form; with k = 1 the
        # blocks are also handed over as a diagonal.
        A_or_d = A[:, :, 0, 0] if k == 1 else A
        return (
            block_recurrence(A, b, reverse=reverse, method=method),
            linear_recurrence(A_or_d, b, reverse=reverse, method=method),
            transposed_recurrence(A_or_d, b, method=method),
            transposed_recurrence(jax.vmap(_blocks_as_dense)(A), b, method=method),
        )

    got, dispatched, transposed, transposed_dense = run(A, b)
    np.testing.assert_allclose(got, want, atol=1e-12, rtol=1e-12)
    np.testing.assert_allclose(dispatched, want, atol=1e-12, rtol=1e-12)
    np.testing.assert_allclose(transposed, transposed_dense, atol=1e-12, rtol=1e-12)


def _para_problem(name, T=200):
    make, _ = _PARA[name]
    cell = make()
    xs = jax.random.normal(jax.random.key(6), (T, M), jnp.float64)
    s0 = jnp.zeros(5) if name == "ParaGRU" else (jnp.zeros(4), jnp.full(4, 0.1))
    return cell, xs, s0


@pytest.mark.parametrize("name", sorted(_PARA))
def test_deer_on_diagonal_recurrence_cells_is_exact_newton(name):
    cell, xs, s0 = _para_problem(name)
    sol = prnn.solve_parallel(cell, xs, s0, prnn.DEER(), rtol=1e-11, atol=1e-11)
    assert bool(sol.converged) and int(sol.num_steps) <= 4
    assert max_abs_diff(sol.states, scan_reference(cell, xs, s0)) < 1e-9
    # The declared structure reaches DEER: no (T, D, D) array in the solve.
    text = str(jax.make_jaxpr(lambda c: prnn.solve_parallel(c, xs, s0, prnn.DEER()))(cell))
    D = 5 if name == "ParaGRU" else 8
    assert f"{len(xs)},{D},{D}]" not in text


@pytest.mark.parametrize("name", sorted(_PARA))
def test_pararnn_gradients_equal_bptt(name):
    cell, xs, s0 = _para_problem(name, T=60)

    def loss_parallel(c):
        states = prnn.solve_parallel(c, xs, s0, prnn.DEER()).states
        return sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree_util.tree_leaves(states))

    def loss_bptt(c):
        states = scan_reference(c, xs, s0)
        return sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree_util.tree_leaves(states))

    g = eqx.filter_grad(loss_parallel)(cell)
    want = eqx.filter_grad(loss_bptt)(cell)
    assert max_abs_diff(g, want) < 1e-8


def test_deer_on_pararnn_under_vmap_float32():
    cell = cells.ParaGRU(M, 6, dtype=jnp.float32, key=jax.random.key(9))
    xs = jax.random.normal(jax.random.key(10), (3, 50, M), jnp.float32)
    s0 = jnp.zeros(6, jnp.float32)
    sols = jax.vmap(lambda x: prnn.solve_parallel(cell, x, s0, prnn.DEER()))(xs)
    want = jax.vmap(lambda x: scan_reference(cell, x, s0))(xs)
    assert bool(jnp.all(sols.converged)) and int(jnp.max(sols.num_steps)) <= 5
    assert max_abs_diff(sols.states, want) < 1e-4


def test_block_quasi_deer_on_lstm_matches_scan_for_every_source_of_blocks():
    lstm = eqx.nn.LSTMCell(M, 4, key=jax.random.key(11), dtype=jnp.float64)
    xs = jax.random.normal(jax.random.key(12), (80, M), jnp.float64)
    s0 = (jnp.zeros(4), jnp.zeros(4))
    want = scan_reference(lstm, xs, s0)
    closure = lambda x, s: lstm(x, s)  # noqa: E731  (no closed forms: autodiff blocks)
    steps = []
    for cell in (lstm, cells.LSTM.wrap(lstm), closure):
        sol = prnn.solve_parallel(cell, xs, s0, prnn.BlockQuasiDEER(block_size=2))
        assert bool(sol.converged)
        assert max_abs_diff(sol.states, want) < 1e-8
        steps.append(int(sol.num_steps))
    assert len(set(steps)) == 1  # the same blocks, whichever way they were computed
    quasi = prnn.solve_parallel(lstm, xs, s0, prnn.QuasiDEER())
    assert steps[0] <= int(quasi.num_steps)


def test_block_quasi_deer_rejects_a_block_size_not_dividing_d():
    cell = eqx.nn.GRUCell(M, 5, key=jax.random.key(0), dtype=jnp.float64)
    xs = jnp.zeros((10, M))
    with pytest.raises(ValueError, match="block_size"):
        prnn.solve_parallel(cell, xs, jnp.zeros(5), prnn.BlockQuasiDEER(block_size=2))
    with pytest.raises(ValueError, match="block_size"):
        prnn.BlockQuasiDEER(block_size=0)


class _Decay(eqx.Module):
    """`s' = tanh(w ⊙ s + x)`: a diagonal-recurrence cell with no methods of its own."""

    w: jax.Array

    def __call__(self, x, s):
        return jnp.tanh(self.w * s + x)


def test_user_registered_cell_takes_the_fast_path():
    calls = []

    def value_and_diagonal(cell, x, s):
        calls.append(type(cell))  # runs at trace time only when the fast path is taken
        new = cell(x, s)
        return new, (1 - new**2) * cell.w

    prnn.register_jacobian(_Decay, structure="diagonal", value_and_diagonal=value_and_diagonal)
    cell = _Decay(jnp.linspace(-0.9, 0.9, 4))
    xs = jax.random.normal(jax.random.key(13), (80, 4), jnp.float64)
    s0 = jnp.zeros(4)
    want = scan_reference(cell, xs, s0)
    solvers = (prnn.QuasiDEER(), prnn.DEER())
    for solver in solvers:
        calls.clear()
        sol = prnn.solve_parallel(cell, xs, s0, solver)
        assert calls and calls[0] is _Decay
        assert bool(sol.converged) and max_abs_diff(sol.states, want) < 1e-9
    # With the exact diagonal declared, DEER takes exactly QuasiDEER's steps (Newton).
    steps = [int(prnn.solve_parallel(cell, xs, s0, s).num_steps) for s in solvers]
    assert steps[0] == steps[1] <= 6


def test_register_jacobian_refuses_incomplete_declarations():
    with pytest.raises(ValueError, match="value_and_diagonal"):
        prnn.register_jacobian(_Decay, structure="diagonal")
    with pytest.raises(ValueError, match="structure"):
        prnn.register_jacobian(_Decay, structure="sparse")
    with pytest.raises(TypeError, match="class"):
        prnn.register_jacobian(_Decay(jnp.zeros(2)))


class _Leak(eqx.Module):
    """Like `_Decay`, registered by the tests below only."""

    w: jax.Array

    def __call__(self, x, s):
        return jnp.tanh(self.w * s + x)


def test_registering_again_after_a_compiled_solve_takes_effect():
    calls = []

    def zero_diagonal(cell, x, s):  # wrong: DEER degrades to Picard
        return cell(x, s), jnp.zeros_like(s)

    def exact_diagonal(cell, x, s):
        calls.append("exact")
        new = cell(x, s)
        return new, (1 - new**2) * cell.w

    cell = _Leak(jnp.linspace(-0.9, 0.9, 4))
    xs = jax.random.normal(jax.random.key(14), (60, 4), jnp.float64)
    s0 = jnp.zeros(4)
    steps = []
    for rule in (zero_diagonal, exact_diagonal):
        prnn.register_jacobian(_Leak, structure="diagonal", value_and_diagonal=rule)
        sol = prnn.solve_parallel(cell, xs, s0, prnn.DEER())
        assert max_abs_diff(sol.states, scan_reference(cell, xs, s0)) < 1e-9
        steps.append(int(sol.num_steps))
    assert calls, "the second registration was not used"
    assert steps[1] <= 6 < steps[0]


class _HalfGRU(eqx.nn.GRUCell):
    """A subclass with its own `__call__`: the GRU's closed forms are not its Jacobians."""

    def __call__(self, input, hidden, *, key=None):
        return 0.5 * super().__call__(input, hidden)


class _SameGRU(eqx.nn.GRUCell):
    """A subclass that keeps `__call__`: it keeps the GRU's closed forms."""


def test_subclass_with_its_own_call_does_not_inherit_the_registered_closed_form():
    key = jax.random.key(15)
    half = _HalfGRU(M, 4, key=key, dtype=jnp.float64)
    assert registered_rule(half) is None
    assert registered_rule(_SameGRU(M, 4, key=key, dtype=jnp.float64)) is registered_rule(
        eqx.nn.GRUCell(M, 4, key=key, dtype=jnp.float64)
    )
    xs = jax.random.normal(jax.random.key(16), (30, M), jnp.float64)
    h0 = jnp.zeros(4)
    # Before: DEER converged to the parent's trajectory and reported not_certified.
    sol = prnn.solve_parallel(half, xs, h0, prnn.DEER())
    assert max_abs_diff(sol.states, scan_reference(half, xs, h0)) < 1e-9


def _wrong_value_shape(cell, x, s):
    return cell(x, s)[:2], cell(x, s)


def _wrong_blocks_shape(cell, x, s):
    return cell(x, s), jnp.ones((3, 2, 2))


def _wrong_value_dtype(cell, x, s):
    return cell(x, s).astype(jnp.float32), jnp.eye(4)


def _wrong_value_structure(cell, x, s):
    return (cell(x, s),), None


@pytest.mark.parametrize(
    "kind, fn, error, match",
    [
        ("value_and_diagonal", _wrong_value_shape, ValueError, r"new_state.*\(4,\).*\(2,\)"),
        ("value_and_blocks", _wrong_blocks_shape, ValueError, r"blocks.*D = 4.*\(3, 2, 2\)"),
        ("value_and_jacobian", _wrong_value_dtype, TypeError, r"new_state.*dtype.*float32"),
        ("value_and_gated", _wrong_value_structure, ValueError, r"new_state.*structure"),
    ],
)
def test_registered_closed_form_with_wrong_shapes_is_refused_naming_the_function(
    kind, fn, error, match
):
    class Cell(_Leak):  # a fresh class per case
        pass

    prnn.register_jacobian(Cell, **{kind: fn})
    cell = Cell(jnp.linspace(-0.9, 0.9, 4))
    with pytest.raises(error, match=match) as info:
        prnn.solve_parallel(cell, jnp.zeros((5, 4)), jnp.zeros(4))
    message = str(info.value)
    assert fn.__name__ in message and f"register_jacobian(Cell, {kind}=" in message
    assert "cell.diagonal_jacobian" not in message


# Gated form of the dense Jacobian (`GatedJacobian`): Equinox's own cells
# (registered) and `cells.GRU` / `cells.LSTM` (methods), against jacfwd and against
# dense solves.
_WRAPPERS = {"gru": cells.GRU, "lstm": cells.LSTM}


@pytest.mark.parametrize("kind", sorted(_EQX))
def test_gated_jacobian_dense_diagonal_and_products_equal_jacfwd(kind):
    make, state_fn = _EQX[kind]
    cell = make()
    both = (cell, _WRAPPERS[kind.split("-")[0]].wrap(cell))
    rules = [jacobian_rule(c) for c in both]
    assert all(rule.value_and_gated is not None for rule in rules)

    @jax.jit
    def evaluate(x, s, v):
        out = []
        for c, rule in zip(both, rules):
            value, gated = rule.value_and_gated(c, x, s)
            matvec, rmatvec = step_products(gated.weight, gated.size)
            Jv = matvec(gated.coeffs, gated.blocks, v)
            out.append(
                (value, gated.dense(), gated.diagonal(), Jv, rmatvec(gated.coeffs, gated.blocks, v))
            )
        return _flat_jacobian(cell, x, s), cell(x, s), out

    for key in jax.random.split(jax.random.key(14), 2):
        x, s = _point(state_fn, key)
        v = jax.random.normal(key, (jax.flatten_util.ravel_pytree(s)[0].size,), jnp.float64)
        J, want, out = evaluate(x, s, v)
        for value, dense, diagonal, Jv, JTv in out:
            assert max_abs_diff(value, want) < 1e-12
            np.testing.assert_allclose(dense, J, atol=1e-12, rtol=0)
            np.testing.assert_allclose(diagonal, jnp.diag(J), atol=1e-12, rtol=0)
            np.testing.assert_allclose(Jv, J @ v, atol=1e-12, rtol=0)
            np.testing.assert_allclose(JTv, J.T @ v, atol=1e-12, rtol=0)


def _random_gated(key, T, K, m, p, k):
    """A `GatedJacobian` over `T` steps with `D = p·m`, `k×k` blocks, random entries."""
    D = p * m
    kw, kc, kb = jax.random.split(key, 3)
    weight = jax.random.normal(kw, (K * m, m), jnp.float64) / m
    coeffs = 0.5 * jax.random.normal(kc, (T, K, D), jnp.float64)
    blocks = 0.4 * jax.random.normal(kb, (T, D // k, k, k), jnp.float64)
    return prnn.GatedJacobian(weight, coeffs, blocks)


@pytest.mark.parametrize("shape", [(3, 5, 1, 1), (4, 3, 2, 2)], ids=["gru-like", "lstm-like"])
def test_gated_recurrence_equals_dense_block_bidiagonal_solve(shape):
    # shape = (K, m, p, k): K weight blocks of m×m, D = p·m, k×k local blocks.
    T = 9
    A = _random_gated(jax.random.key(15), T, *shape)
    b = jax.random.normal(jax.random.key(16), (T, A.size), jnp.float64)
    # The dense matrices built independently of `dense()`: tile_p(W_k) scaled row
    # by row, zero-padded on the right, plus the blocks' own dense form.
    K, m, p, _ = shape
    W = np.tile(np.asarray(A.weight).reshape(K, m, m), (1, p, 1))
    rows = np.einsum("tki,kij->tij", np.asarray(A.coeffs), W)
    independent = np.concatenate([rows, np.zeros((T, A.size, A.size - m))], axis=2)
    independent += np.stack([np.asarray(_blocks_as_dense(B)) for B in A.blocks])
    np.testing.assert_allclose(A.dense(), independent, atol=1e-14, rtol=0)

    @jax.jit
    def run(A, b):
        methods = ("sequential", "associative")
        return (
            [linear_recurrence(A, b, reverse=r, method=m) for m in methods for r in (False, True)],
            [transposed_recurrence(A, b, method=m) for m in methods],
            transposed_recurrence(A.dense(), b, method="sequential"),
        )

    solves, transposed, transposed_dense = run(A, b)
    for i, got in enumerate(solves):
        want = _block_bidiagonal_solve(independent, b, reverse=i % 2 == 1)
        np.testing.assert_allclose(got, want, atol=1e-12, rtol=1e-12)
    for got in transposed:
        np.testing.assert_allclose(got, transposed_dense, atol=1e-12, rtol=1e-12)


def _gated_problem(kind, dtype, T):
    if kind == "gru":
        cell = eqx.nn.GRUCell(M, 5, key=jax.random.key(17), dtype=dtype)
        s0 = jnp.full(5, 0.1, dtype)
    else:
        cell = eqx.nn.LSTMCell(M, 4, key=jax.random.key(18), dtype=dtype)
        s0 = (jnp.zeros(4, dtype), jnp.full(4, 0.1, dtype))
    xs = jax.random.normal(jax.random.key(19), (T, M), dtype)
    return cell, xs, s0


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_deer_on_gated_cells_matches_scan_without_dense_jacobians(kind):
    cell, xs, s0 = _gated_problem(kind, jnp.float64, 64)
    sol = prnn.solve_parallel(cell, xs, s0, prnn.DEER(), rtol=1e-11, atol=1e-11)
    assert bool(sol.converged) and max_abs_diff(sol.states, scan_reference(cell, xs, s0)) < 1e-9
    # Sequentially (the CPU default) the (T, D, D) Jacobians are never formed.
    solve = lambda c: prnn.solve_parallel(c, xs, s0, prnn.DEER(scan="sequential"))  # noqa: E731
    D = 5 if kind == "gru" else 8
    assert f"{len(xs)},{D},{D}]" not in str(jax.make_jaxpr(solve)(cell))
    if kind == "gru":  # float32, batched and jitted
        cell32, xs32, s032 = _gated_problem(kind, jnp.float32, 64)
        xs32 = jnp.stack([xs32, -xs32, 0.5 * xs32])
        sols = jax.jit(jax.vmap(lambda x: prnn.solve_parallel(cell32, x, s032, prnn.DEER())))(xs32)
        want32 = jax.vmap(lambda x: scan_reference(cell32, x, s032))(xs32)
        assert bool(jnp.all(sols.converged)) and max_abs_diff(sols.states, want32) < 1e-4


def test_deer_gradients_on_gated_lstm_equal_bptt():
    # The GRU's (through `_DenseAdjoint` too) are checked in test_grad.py.
    cell, xs, s0 = _gated_problem("lstm", jnp.float64, 40)

    def loss(c, solve):
        states = solve(c)
        return sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree_util.tree_leaves(states))

    parallel = lambda c: prnn.solve_parallel(c, xs, s0, prnn.DEER()).states  # noqa: E731
    g = eqx.filter_grad(loss)(cell, parallel)
    want = eqx.filter_grad(loss)(cell, lambda c: scan_reference(c, xs, s0))
    assert max_abs_diff(g, want) < 1e-8


class _BadGated(eqx.Module):
    w: jax.Array

    def __call__(self, x, s):
        return jnp.tanh(self.w @ s + x)

    def value_and_gated_jacobian(self, x, s):
        return self(x, s), prnn.GatedJacobian(self.w, jnp.ones((2, 3)), jnp.ones((3, 1, 1)))


def test_gated_jacobian_of_wrong_shape_is_refused():
    cell = _BadGated(jnp.eye(3))
    with pytest.raises(ValueError, match="GatedJacobian"):
        prnn.solve_parallel(cell, jnp.zeros((5, 3)), jnp.zeros(3), prnn.DEER())
