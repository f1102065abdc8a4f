"""Promises kept in the corners (issue 14): finite states, certified convergence,
failure reasons, NumPy scalars, layout hints, forward-mode derivatives.

Oracles: a plain `lax.scan` (`helpers.scan_reference`) and autodiff through it,
and the residual recomputed here with `jax.vmap(cell)`.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import parallel_rnn as prnn

from .helpers import max_abs_diff, scan_reference


T, D, M = 30, 4, 3
CELL = eqx.nn.GRUCell(M, D, key=jax.random.key(0))
XS = jax.random.normal(jax.random.key(1), (T, M))
H0 = jnp.zeros(D)
REF = scan_reference(CELL, XS, H0)
QUASI_AND_DENSE = [prnn.QuasiDEER(), prnn.DEER(), prnn.QuasiELK(), prnn.ELK()]


def _ids(solver):
    return type(solver).__name__


def _true_residual(cell, xs, h0, states):
    prev = jnp.concatenate([h0[None], states[:-1]])
    return float(jnp.max(jnp.abs(states - jax.vmap(cell)(xs, prev))))


# --------------------------------------------------------------------------------------
# Non-finite init_state and guesses


def test_nan_init_state_gives_finite_states_and_the_nonfinite_reason():
    sol = prnn.solve_parallel(CELL, XS, jnp.full(D, jnp.nan), throw=False)
    assert bool(jnp.all(jnp.isfinite(sol.states)))
    assert not bool(sol.converged)
    assert sol.result == prnn.RESULTS.nonfinite


def test_non_finite_rows_of_a_guess_never_come_back():
    guess = REF.at[20].set(jnp.nan).at[25, 1].set(jnp.inf)
    sol = prnn.solve_parallel(CELL, XS, H0, guess=guess, max_steps=2, throw=False)
    assert bool(jnp.all(jnp.isfinite(sol.states)))
    assert not bool(sol.converged) and sol.result == prnn.RESULTS.max_steps_reached
    # Given enough steps the sanitised guess converges to the right answer.
    sol = prnn.solve_parallel(CELL, XS, H0, guess=guess)
    assert max_abs_diff(sol.states, REF) < 1e-8


# --------------------------------------------------------------------------------------
# `converged` is certified by the cell's own __call__


class _OffByEpsilon(eqx.Module):
    """Fused methods whose value is 1e-3 off `__call__` (their Jacobians are right)."""

    cell: eqx.nn.GRUCell

    def __call__(self, x, s):
        return self.cell(x, s)

    def _jac(self, x, s):
        return jax.jacfwd(lambda s_: self.cell(x, s_))(s)

    def value_and_jacobian(self, x, s):
        return self.cell(x, s) + 1e-3, self._jac(x, s)

    def diagonal_jacobian(self, x, s):
        return jnp.diag(self._jac(x, s))

    def value_and_diagonal_jacobian(self, x, s):
        return self.cell(x, s) + 1e-3, self.diagonal_jacobian(x, s)


@pytest.mark.parametrize("solver", QUASI_AND_DENSE, ids=_ids)
def test_fused_value_off_the_cell_is_not_certified(solver):
    # Without the polish: its Newton step, with the residual of `__call__`, would
    # correct the answer onto the true recurrence (tested below).
    sol = prnn.solve_parallel(_OffByEpsilon(CELL), XS, H0, solver, throw=False, polish=False)
    true = _true_residual(CELL, XS, H0, sol.states)
    assert true > 1e-4  # the iteration followed the fused value ...
    assert not bool(sol.converged)  # ... which is not the recurrence
    assert sol.result == prnn.RESULTS.not_certified
    assert float(sol.residual) == pytest.approx(true, rel=1e-6)


def test_not_certified_has_its_own_message():
    with pytest.raises(eqx.EquinoxRuntimeError, match="recomputed with the cell's own __call__"):
        jax.block_until_ready(
            prnn.solve_parallel(_OffByEpsilon(CELL), XS, H0, prnn.DEER(), polish=False)
        )


def test_polish_corrects_a_fused_value_onto_the_certified_recurrence():
    sol = prnn.solve_parallel(_OffByEpsilon(CELL), XS, H0, prnn.DEER(), throw=False)
    assert bool(sol.converged)  # certified by `__call__`, not by the fused value
    assert float(_true_residual(CELL, XS, H0, sol.states)) <= float(sol.residual) * (1 + 1e-6)


def test_implicit_ssm_inner_failure_makes_the_solve_fail():
    ssm = prnn.cells.ImplicitSSM(M, D, 5, max_steps=1, key=jax.random.key(2))
    sol = prnn.solve_parallel(ssm, XS, H0, prnn.QuasiDEER(), throw=False)
    assert not bool(sol.converged)
    assert sol.result == prnn.RESULTS.nonfinite
    assert bool(jnp.all(jnp.isfinite(sol.states)))
    # (tests/test_cells.py checks that the default inner budget converges.)


# --------------------------------------------------------------------------------------
# Options: NumPy scalars are scalars


def test_numpy_scalar_options_are_accepted():
    sol = prnn.solve_parallel(
        CELL,
        XS,
        H0,
        rtol=np.float32(1e-9),
        atol=np.float64(1e-9),
        max_steps=np.int64(T),
        throw=False,
    )
    assert bool(sol.converged)
    sol = prnn.solve_parallel(CELL, XS, H0, prnn.Jacobi(), max_steps=np.int32(2), throw=False)
    assert int(sol.num_steps) == 2


def test_non_numbers_and_traced_options_are_refused_by_name():
    with pytest.raises(TypeError, match="max_steps.*integer"):
        prnn.solve_parallel(CELL, XS, H0, max_steps=2.5)
    with pytest.raises(TypeError, match="rtol.*not a bool"):
        prnn.solve_parallel(CELL, XS, H0, rtol=True)
    with pytest.raises(TypeError, match="atol.*static"):
        jax.jit(lambda a: prnn.solve_parallel(CELL, XS, H0, atol=a).states)(1e-6)
    with pytest.raises(ValueError, match="rtol"):
        prnn.solve_parallel(CELL, XS, H0, rtol=np.float64(np.nan))


# --------------------------------------------------------------------------------------
# Failure reasons: distinct messages, readable under jit


def test_each_failure_reason_has_its_own_message():
    with pytest.raises(eqx.EquinoxRuntimeError, match="within `max_steps` iterations"):
        jax.block_until_ready(prnn.solve_parallel(CELL, XS, H0, prnn.Jacobi(), max_steps=2))
    with pytest.raises(eqx.EquinoxRuntimeError, match="no progress possible"):
        jax.block_until_ready(prnn.solve_parallel(CELL, XS.at[3, 0].set(jnp.nan), H0))
    names = ("successful", "max_steps_reached", "nonfinite", "not_certified")
    names += ("adjoint_not_converged",)
    messages = {prnn.RESULTS[getattr(prnn.RESULTS, name)] for name in names}
    assert len(messages) == len(names) == len(prnn.RESULTS)


def _failing_solve(xs):
    return prnn.solve_parallel(CELL, xs, H0, prnn.Jacobi(), max_steps=2)


def test_failure_under_a_users_jax_jit_carries_the_message():
    # Under jax.jit the runtime error is JAX's, but the text holds our message.
    with pytest.raises(Exception, match="within `max_steps` iterations"):
        jax.block_until_ready(jax.jit(lambda xs: _failing_solve(xs).states)(XS))
    # eqx.filter_jit gives Equinox's own error type with the same message.
    with pytest.raises(eqx.EquinoxRuntimeError, match="within `max_steps` iterations"):
        jax.block_until_ready(eqx.filter_jit(lambda xs: _failing_solve(xs).states)(XS))


def test_result_is_readable_under_jit_and_vmap_with_throw_false():
    @jax.jit
    def reasons(xs):
        sol = prnn.solve_parallel(CELL, xs, H0, prnn.Jacobi(), max_steps=T, throw=False)
        return sol.result == prnn.RESULTS.successful, sol.result == prnn.RESULTS.nonfinite

    xs = jnp.stack([XS, XS.at[5, 1].set(jnp.nan)])
    ok, nonfinite = jax.vmap(reasons)(xs)
    assert ok.tolist() == [True, False] and nonfinite.tolist() == [False, True]


def test_derivative_failure_has_its_own_message():
    def loss(xs):
        return jnp.sum(prnn.solve_parallel(CELL, xs, H0).states * jnp.nan)

    # The backward pass runs outside solve_parallel's own jit: wrap the derivative in
    # eqx.filter_jit for Equinox's error type (plain JAX errors carry the same text).
    with pytest.raises(eqx.EquinoxRuntimeError, match="derivative of solve_parallel"):
        jax.block_until_ready(eqx.filter_jit(jax.grad(loss))(XS))
    states = lambda xs: prnn.solve_parallel(CELL, xs, H0).states
    with pytest.raises(Exception, match="derivative of solve_parallel"):
        jax.block_until_ready(jax.jvp(states, (XS,), (jnp.full_like(XS, jnp.nan),)))


# --------------------------------------------------------------------------------------
# Layout mistakes get a hint


def test_batched_inputs_get_a_vmap_hint():
    with pytest.raises(TypeError, match=r"\(T, \.\.\.\) for one sequence; use jax.vmap"):
        prnn.solve_parallel(CELL, jnp.ones((5, T, M)), H0)


def test_time_last_inputs_get_a_hint():
    with pytest.raises(TypeError, match=r"time-last"):
        prnn.solve_parallel(CELL, XS.T, H0)


# --------------------------------------------------------------------------------------
# Forward-mode derivatives agree with the same through lax.scan (float64, 1e-8)


def _scaled(p):
    """A cell, inputs and initial state that depend smoothly on three scalars."""
    cell = eqx.tree_at(lambda c: c.weight_hh, CELL, CELL.weight_hh * p[0])
    return cell, XS * p[1], (0.1 + H0) * p[2]


def _loss(p, evaluate):
    cell, xs, h0 = _scaled(p)
    return jnp.sum(jnp.sin(evaluate(cell, xs, h0)))


P = jnp.array([1.0, 0.9, 1.1])
TANGENT = jnp.array([0.3, -0.2, 0.5])


def _parallel(solver):
    return lambda cell, xs, h0: prnn.solve_parallel(cell, xs, h0, solver).states


@functools.cache
def _scan_hessian():
    """The oracle's Hessian of `_loss` at `P` (shared by the two second-order tests)."""
    h = jax.hessian(lambda p: _loss(p, scan_reference))(P)
    assert float(jnp.max(jnp.abs(h))) > 1e-2
    return h


def test_jvp_linearize_jacfwd_hessian_match_scan():
    solver = prnn.QuasiDEER()
    par = lambda p: _loss(p, _parallel(solver))
    seq = lambda p: _loss(p, scan_reference)
    (v1, t1), (v2, t2) = jax.jvp(par, (P,), (TANGENT,)), jax.jvp(seq, (P,), (TANGENT,))
    assert abs(float(v1 - v2)) < 1e-8 and abs(float(t1 - t2)) < 1e-8
    _, lin = jax.linearize(par, P)
    assert abs(float(lin(TANGENT) - t2)) < 1e-8
    # jacfwd of the whole trajectory, not just a scalar loss.
    traj_par = lambda p: _parallel(solver)(*_scaled(p))
    traj_seq = lambda p: scan_reference(*_scaled(p))
    assert max_abs_diff(jax.jacfwd(traj_par)(P), jax.jacfwd(traj_seq)(P)) < 1e-8
    # hessian = jacfwd(jacrev): forward mode through the adjoint solve too.
    assert max_abs_diff(jax.hessian(par)(P), _scan_hessian()) < 1e-8


def test_reverse_over_reverse_matches_scan():
    # docs/limitations.md: `jax.jacrev(jax.grad(...))` works (reverse through the adjoint).
    par = lambda p: _loss(p, _parallel(prnn.QuasiDEER()))
    assert max_abs_diff(jax.jacrev(jax.grad(par))(P), _scan_hessian()) < 1e-8


def test_dense_solver_jvp_under_jit_and_vmap_with_pytree_state():
    # DEER's tangent is solved by Newton with dense Jacobians (the other code path).
    cell = eqx.nn.LSTMCell(M, D, key=jax.random.key(3))
    s0 = (0.1 * jnp.ones(D), jnp.zeros(D))
    xs = jnp.stack([XS, 0.5 * XS])
    dxs = jax.random.normal(jax.random.key(4), xs.shape)

    def run(f):
        return jax.jit(jax.vmap(lambda x, dx: jax.jvp(f, (x,), (dx,))))(xs, dxs)

    par = run(lambda x: prnn.solve_parallel(cell, x, s0, prnn.DEER()).states)
    seq = run(lambda x: scan_reference(cell, x, s0))
    assert max_abs_diff(par, seq) < 1e-8


def test_quasi_gradient_memory_is_linear_in_the_state_size():
    # Compiled (not run): temporaries of jax.grad through QuasiDEER grow like T*D,
    # from D = 8 to D = 32 (measured 4.0x for cells.GRU); DEER, which holds the
    # T*D*D Jacobians, measured 6.9x, so such an array in the quasi gradient fails this.
    def temp_bytes(solver, d):
        cell = prnn.cells.GRU(2, d, key=jax.random.key(0))
        xs = jnp.zeros((256, 2))

        def loss(cell):
            return jnp.sum(prnn.solve_parallel(cell, xs, jnp.zeros(d), solver).states)

        compiled = jax.jit(lambda c: eqx.filter_grad(loss)(c)).lower(cell).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes(prnn.QuasiDEER(), 32) < 5 * temp_bytes(prnn.QuasiDEER(), 8)
