"""Cells holding a `jax.custom_vjp` function, which JAX cannot push tangents through.

Their Jacobians come from VJPs (`jax.jacrev`, one VJP per row) and their gradient
from the adjoint alone. Oracles: `lax.scan` for the states, `jax.grad` through it
for the gradient, `jax.jacrev` for the Jacobians.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import parallel_rnn as prnn
from parallel_rnn._problem import FlatCell, autodiff_blocks, autodiff_diagonal, make_spec

from .helpers import max_abs_diff, scan_reference


D, T = 6, 40
F64 = jnp.float64


@jax.custom_vjp
def _tanh(u):
    return jnp.tanh(u)


def _tanh_fwd(u):
    y = jnp.tanh(u)
    return y, y


def _tanh_bwd(y, g):
    return (g * (1 - y**2),)  # a hand-written VJP


_tanh.defvjp(_tanh_fwd, _tanh_bwd)


class VJPCell(eqx.Module):
    w: jax.Array
    u: jax.Array

    def __init__(self):
        k1, k2 = jax.random.split(jax.random.key(30))
        self.w = 0.25 * jax.random.normal(k1, (D, D), F64)
        self.u = jax.random.normal(k2, (D, D), F64)

    def __call__(self, x, s):
        # A mixing layer after the custom_vjp: the Jacobian is dense.
        return 0.9 * _tanh(self.w @ s + self.u @ x) + 0.05 * (self.w @ s)


_CELL = VJPCell()
_XS = jax.random.normal(jax.random.key(31), (T, D), F64)
_H = jnp.zeros(D, F64)


def test_forward_mode_is_really_refused_for_this_cell():
    # The premise of the file: jvp of the cell raises (so the library must not use it).
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda s: _CELL(_XS[0], s), (_H,), (_H,))


@pytest.mark.parametrize(
    "solver",
    [
        prnn.DEER(),
        prnn.QuasiDEER(),
        prnn.ELK(),
        prnn.QuasiELK(),
        prnn.BlockQuasiDEER(),
        prnn.MultipleShooting(chunk=5, rank=2),  # no tangents: exact chunk Jacobians by VJPs
    ],  # fmt: skip
    ids=lambda s: type(s).__name__,
)
def test_solvers_on_custom_vjp_cell_match_scan(solver):
    sol = prnn.solve_parallel(_CELL, _XS, _H, solver)
    assert max_abs_diff(sol.states, scan_reference(_CELL, _XS, _H)) < 1e-9


def _loss(solve, cell, xs, h0):
    return jnp.sum(jnp.sin(solve(cell, xs, h0)) * jnp.linspace(0.5, 1.5, T)[:, None])


# DEER: the dense adjoint with Jacobians from jax.jacrev; QuasiDEER: the adjoint
# solved by QuasiDEER on VJPs of the cell.
@pytest.mark.parametrize("solver", [prnn.DEER(), prnn.QuasiDEER()], ids=["DEER", "QuasiDEER"])
def test_grad_through_solve_of_custom_vjp_cell_matches_grad_through_scan(solver):
    def parallel(cell, xs, h0):
        return prnn.solve_parallel(cell, xs, h0, solver).states

    args = (_CELL, _XS, 0.1 * jnp.ones(D, F64))
    actual = eqx.filter_grad(lambda a: _loss(parallel, *a))(args)
    expected = eqx.filter_grad(lambda a: _loss(scan_reference, *a))(args)
    assert max_abs_diff(actual, expected) < 1e-8
    assert float(jnp.max(jnp.abs(actual[0].w))) > 1e-3


def test_forward_mode_through_solve_of_custom_vjp_cell_is_refused_naming_custom_vjp():
    def states(xs):
        return prnn.solve_parallel(_CELL, xs, _H).states

    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(states, (_XS,), (_XS,))


def test_jacobian_fallbacks_without_forward_mode_match_jacrev():
    fn = FlatCell(_CELL, None, make_spec(_H), forward_mode=False)
    prev = jax.random.normal(jax.random.key(32), (3, D), F64)
    xs = _XS[:3]
    jac = jax.vmap(lambda x, s: jax.jacrev(lambda s_: fn(x, s_))(s))(xs, prev)
    diag = autodiff_diagonal(fn, xs, prev, forward_mode=False)
    assert max_abs_diff(diag, jnp.diagonal(jac, axis1=1, axis2=2)) < 1e-14
    k, n = 3, D // 3
    blocks = autodiff_blocks(fn, xs, prev, k, forward_mode=False)
    # Block j couples the flat entries j, n + j, ... (the layout of `_structure.py`).
    expected = jnp.stack(
        [jac[:, j::n, j::n] for j in range(n)], axis=1
    )  # (T, n, k, k): [t, j, a, b] = J[a n + j, b n + j]
    assert max_abs_diff(blocks, expected) < 1e-14
