"""The cells: analytic Jacobian diagonals vs autodiff, Equinox parity, parallel vs scan."""

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import pytest

import parallel_rnn as prnn
from parallel_rnn import cells

from .helpers import max_abs_diff, scan_reference


M = 3  # input size
T = 64


def _gru():
    return cells.GRU(M, 6, key=jax.random.key(0)), jnp.zeros(6)


def _lstm():
    return cells.LSTM(M, 5, key=jax.random.key(1)), (jnp.zeros(5), jnp.full(5, 0.1))


def _elman():
    return cells.Elman(M, 6, gain=1.2, key=jax.random.key(2)), jnp.zeros(6)


def _lorenz():
    cell = cells.Lorenz96(dim=5, forcing=8.0, dt=0.01)
    return cell, jnp.full(5, 8.0).at[0].add(0.01)


def _implicit():
    return cells.ImplicitSSM(M, 4, 5, key=jax.random.key(3)), jnp.zeros(4)


CELLS = {
    "gru": _gru,
    "lstm": _lstm,
    "elman": _elman,
    "lorenz96": _lorenz,
    "implicit_ssm": _implicit,
}


def _inputs(name, length, key):
    # Lorenz96 takes an input of the state's size, added to the forcing.
    size = 5 if name == "lorenz96" else M
    scale = 0.5 if name == "lorenz96" else 1.0
    return scale * jax.random.normal(key, (length, size))


def _random_state(s0, key, scale):
    leaves, treedef = jax.tree_util.tree_flatten(s0)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef,
        [jax.random.uniform(k, x.shape, x.dtype, -scale, scale) for k, x in zip(keys, leaves)],
    )


@pytest.mark.parametrize("name", CELLS)
def test_diagonal_jacobian_equals_diagonal_of_jacfwd(name):
    cell, s0 = CELLS[name]()
    # ImplicitSSM's contraction is guaranteed in [-1, 1]^D; Lorenz96 lives near ±10.
    scale = {"lorenz96": 10.0, "implicit_ssm": 1.0}.get(name, 2.0)

    def errors(key):
        k1, k2 = jax.random.split(key)
        x = _inputs(name, 1, k1)[0]
        s = _random_state(s0, k2, scale)
        jac = jax.jacfwd(lambda s_: cell(x, s_))(s)
        diag = cell.diagonal_jacobian(x, s)
        value, diag2 = cell.value_and_diagonal_jacobian(x, s)
        if isinstance(s, tuple):  # LSTM: the h->h and c->c blocks
            ref = (jnp.diag(jac[0][0]), jnp.diag(jac[1][1]))
        else:
            ref = jnp.diag(jac)
        return (
            _tree_err(diag, ref),
            _tree_err(diag2, ref),
            _tree_err(value, cell(x, s)),
        )

    d_err, d2_err, v_err = jax.jit(jax.vmap(errors))(jax.random.split(jax.random.key(10), 4))
    assert float(jnp.max(d_err)) < 1e-10
    assert float(jnp.max(d2_err)) < 1e-10
    assert float(jnp.max(v_err)) < 1e-12


DENSE = ["gru", "lstm", "elman"]  # the cells with a closed-form value_and_jacobian


@pytest.mark.parametrize("name", DENSE)
def test_value_and_jacobian_equals_jacfwd_of_flat_state(name):
    cell, s0 = CELLS[name]()

    def errors(key):
        k1, k2 = jax.random.split(key)
        x = _inputs(name, 1, k1)[0]
        s = _random_state(s0, k2, 2.0)
        flat, unravel = jax.flatten_util.ravel_pytree(s)
        ref = jax.jacfwd(lambda f: jax.flatten_util.ravel_pytree(cell(x, unravel(f)))[0])(flat)
        value, jac = cell.value_and_jacobian(x, s)
        return jnp.max(jnp.abs(jac - ref)), _tree_err(value, cell(x, s))

    j_err, v_err = jax.jit(jax.vmap(errors))(jax.random.split(jax.random.key(11), 4))
    assert float(jnp.max(j_err)) < 1e-12
    assert float(jnp.max(v_err)) == 0.0


@pytest.mark.parametrize("name", DENSE)
def test_value_and_jacobian_keeps_float32(name):
    cell, s0 = CELLS[name]()
    cell = jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float32) if eqx.is_inexact_array(a) else a, cell
    )
    s0 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), s0)
    value, jac = cell.value_and_jacobian(jnp.ones(M, jnp.float32), s0)
    assert jac.dtype == jnp.float32
    assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(value))


def _tree_err(a, b):
    diffs = jax.tree_util.tree_map(lambda x, y: jnp.max(jnp.abs(x - y)), a, b)
    return jnp.max(jnp.stack(jax.tree_util.tree_leaves(diffs)))


@eqx.filter_jit
def _lorenz_error(cell, u, x):
    ref = jnp.diag(jax.jacfwd(lambda s: cell(u, s))(x))
    return jnp.max(jnp.abs(cell.diagonal_jacobian(u, x) - ref))


def test_lorenz96_diagonal_is_exact_for_small_and_wrapping_dims():
    # For D < 4 the cyclic bands overlap; the banded products must still be exact.
    for dim in (1, 2, 3, 8):
        cell = cells.Lorenz96(dim=dim, dt=0.05)
        x = 5 * jax.random.normal(jax.random.key(dim), (dim,))
        u = jax.random.normal(jax.random.key(dim + 100), (dim,))
        assert float(_lorenz_error(cell, u, x)) < 1e-10


def test_gru_and_lstm_equal_equinox_cells():
    x = jax.random.normal(jax.random.key(5), (M,))
    gru = cells.GRU(M, 6, key=jax.random.key(6))
    eqx_gru = eqx.nn.GRUCell(M, 6, key=jax.random.key(6))
    h = jax.random.normal(jax.random.key(7), (6,))
    assert jnp.array_equal(gru(x, h), eqx_gru(x, h))
    assert jnp.array_equal(cells.GRU.wrap(eqx_gru)(x, h), eqx_gru(x, h))
    assert jnp.array_equal(gru.value_and_diagonal_jacobian(x, h)[0], eqx_gru(x, h))

    lstm = cells.LSTM(M, 5, key=jax.random.key(8))
    eqx_lstm = eqx.nn.LSTMCell(M, 5, key=jax.random.key(8))
    state = (
        jax.random.normal(jax.random.key(9), (5,)),
        jax.random.normal(jax.random.key(10), (5,)),
    )
    for ours in (lstm, cells.LSTM.wrap(eqx_lstm)):
        assert max_abs_diff(ours(x, state), eqx_lstm(x, state)) == 0.0
    assert max_abs_diff(lstm.value_and_diagonal_jacobian(x, state)[0], eqx_lstm(x, state)) == 0.0

    # Without bias, too.
    nobias = eqx.nn.GRUCell(M, 6, use_bias=False, key=jax.random.key(11))
    assert jnp.array_equal(
        cells.GRU.wrap(nobias).value_and_diagonal_jacobian(x, h)[0], nobias(x, h)
    )
    with pytest.raises(TypeError):
        cells.GRU.wrap(eqx_lstm)


def test_float32_cells_keep_float32():
    x = jnp.ones(M, jnp.float32)
    for cell, s in (
        (cells.GRU(M, 4, dtype=jnp.float32, key=jax.random.key(0)), jnp.zeros(4, jnp.float32)),
        (cells.Elman(M, 4, dtype=jnp.float32, key=jax.random.key(0)), jnp.zeros(4, jnp.float32)),
        (
            cells.ImplicitSSM(M, 4, 3, dtype=jnp.float32, key=jax.random.key(0)),
            jnp.zeros(4, jnp.float32),
        ),
        (cells.Lorenz96(dim=M), jnp.ones(M, jnp.float32)),
    ):
        value, diag = eqx.filter_jit(lambda c, x, s: c.value_and_diagonal_jacobian(x, s))(
            cell, x, s
        )
        assert value.dtype == jnp.float32
        assert diag.dtype == jnp.float32


@pytest.mark.parametrize("solver", [prnn.DEER(), prnn.QuasiDEER()], ids=["DEER", "QuasiDEER"])
@pytest.mark.parametrize("name", CELLS)
def test_parallel_solve_matches_scan(name, solver):
    cell, s0 = CELLS[name]()
    xs = _inputs(name, T, jax.random.key(20))
    sol = prnn.solve_parallel(cell, xs, s0, solver, throw=False)
    assert bool(sol.converged)
    # The solve's tolerance is on the residual; the chaotic Lorenz96 (states ~10)
    # amplifies residuals of ~1e-9 along the trajectory.
    err = 1e-7 if name == "lorenz96" else 1e-8
    assert max_abs_diff(sol.states, scan_reference(cell, xs, s0)) < err


def test_implicit_ssm_gradient_matches_autodiff_through_scan():
    cell, s0 = _implicit()
    xs = _inputs("implicit_ssm", 32, jax.random.key(30))
    weights = jax.random.normal(jax.random.key(31), (32, 4))

    def loss_parallel(cell, xs):
        sol = prnn.solve_parallel(cell, xs, s0, prnn.QuasiDEER())
        return jnp.sum(weights * jnp.sin(sol.states))

    def loss_scan(cell, xs):
        return jnp.sum(weights * jnp.sin(scan_reference(cell, xs, s0)))

    g_par = eqx.filter_grad(loss_parallel)(cell, xs)
    g_seq = eqx.filter_grad(loss_scan)(cell, xs)
    assert bool(eqx.tree_equal(g_par, g_seq, rtol=1e-5, atol=1e-9))
    # ... and the gradient is not trivially zero.
    assert float(jnp.max(jnp.abs(g_seq.w_zh))) > 1e-4


def test_implicit_ssm_inner_solve_reports_non_convergence():
    cell, _ = _implicit()
    x = _inputs("implicit_ssm", 1, jax.random.key(40))[0]
    s = jnp.linspace(-0.9, 0.9, 4)
    z, ok = cell.inner_solve(x, s)
    assert bool(ok)
    # Converged: z is a fixed point to the inner tolerance.
    phi = cell._phi(z, cell._gates(z, s, x).h, x, cell._scale())
    assert float(jnp.max(jnp.abs(phi - z))) < 1e-11

    one_step = cells.ImplicitSSM(M, 4, 5, max_steps=1, key=jax.random.key(3))
    z1, ok1 = one_step.inner_solve(x, s)
    assert not bool(ok1)
    assert bool(jnp.all(jnp.isfinite(z1)))
    assert float(jnp.max(jnp.abs(z1 - z))) > 1e-6


def test_implicit_ssm_constructor_validates():
    with pytest.raises(ValueError, match="contraction"):
        cells.ImplicitSSM(M, 4, 3, contraction=1.0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="damping"):
        cells.ImplicitSSM(M, 4, 3, damping=1.0, key=jax.random.key(0))
