"""Chunked batched evaluation (`_problem.batched`), the polish's chunked Newton step,
and DEER's spliced linearisation."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import parallel_rnn as prnn
import parallel_rnn._problem as problem_module
from parallel_rnn import cells
from parallel_rnn._gated import GatedJacobian
from parallel_rnn._polish import _newton_step, _time_chunk
from parallel_rnn._problem import Problem, make_spec
from parallel_rnn._scan import linear_recurrence
from parallel_rnn._structure import flat_cell, registered_rule

from .helpers import dense_bidiagonal, gru_problem, lstm_problem, max_abs_diff, scan_reference


def _problem(cell, xs, s0) -> Problem:
    spec = make_spec(s0)
    x0 = jax.tree_util.tree_map(lambda a: a[0], xs)
    return Problem(flat_cell(cell, x0, s0, spec, registered_rule(cell)), xs, spec.ravel(s0))


@pytest.mark.parametrize("make", [gru_problem, lstm_problem])
def test_chunked_evaluations_equal_one_vmap(make, monkeypatch):
    # T = 36 steps of D = 6 (GRU) or 8 (LSTM): 48 entries per chunk give chunks of
    # 8 and 6 steps, which divide 36 (a prime T gets one vmap).
    cell, xs, s0 = make(jnp.float64, 36)
    problem = _problem(cell, xs, s0)
    states = 0.3 * jax.random.normal(jax.random.key(7), (36, make_spec(s0).size), jnp.float64)
    monkeypatch.setattr(problem_module, "CHUNK_ELEMENTS", 0)
    whole = (problem.evaluate(states), *problem.linearise_diagonal(states))
    monkeypatch.setattr(problem_module, "CHUNK_ELEMENTS", 48)
    assert problem_module._chunk_length(36, states.shape[1]) in (6, 8)
    assert problem_module._chunk_length(37, states.shape[1]) is None  # prime
    chunked = (problem.evaluate(states), *problem.linearise_diagonal(states))
    for a, b in zip(whole, chunked):
        assert max_abs_diff(a, b) <= 1e-14


def test_chunked_quasi_deer_solve_matches_scan(monkeypatch):
    # A length that no other test compiles, so the solve is traced with chunks.
    monkeypatch.setattr(problem_module, "CHUNK_ELEMENTS", 48)
    cell, xs, s0 = gru_problem(jnp.float64, 56)  # D = 6: chunks of 8 steps
    sol = prnn.solve_parallel(cell, xs, s0, prnn.QuasiDEER())
    assert sol.converged
    assert max_abs_diff(sol.states, scan_reference(cell, xs, s0)) <= 1e-8


def _para(kind, dtype, T):
    M = 3
    xs = jax.random.normal(jax.random.key(4), (T, M), dtype)
    if kind == "ParaGRU":  # exact diagonal Jacobian
        return cells.ParaGRU(M, 6, dtype=dtype, key=jax.random.key(5)), xs, jnp.zeros(6, dtype)
    if kind == "ParaLSTM":  # exact 2×2-block Jacobian
        s0 = (jnp.zeros(4, dtype), jnp.full(4, 0.1, dtype))
        return cells.ParaLSTM(M, 4, dtype=dtype, key=jax.random.key(6)), xs, s0
    # Elman: a dense closed-form Jacobian (`value_and_jacobian`)
    return cells.Elman(M, 6, gain=1.2, dtype=dtype, key=jax.random.key(7)), xs, jnp.zeros(6, dtype)


_NEWTON_CASES = {  # gated (GRU, LSTM), exact diagonal, exact blocks, dense closed form
    "GRU-f64": (gru_problem, jnp.float64),
    "GRU-f32": (gru_problem, jnp.float32),
    "LSTM-f64": (lstm_problem, jnp.float64),
    **{
        f"{kind}-f64": (lambda dtype, T, kind=kind: _para(kind, dtype, T), jnp.float64)
        for kind in ("ParaGRU", "ParaLSTM", "Elman")
    },
}


@pytest.mark.parametrize("make, dtype", _NEWTON_CASES.values(), ids=_NEWTON_CASES.keys())
def test_chunked_polish_step_equals_one_pass_and_a_dense_solve(make, dtype, monkeypatch):
    # The polish's Newton step at a perturbed trajectory, in chunks of 6 steps
    # (T = 36; 48 entries per chunk, D = 6 or 8) against the one-pass step, and
    # its correction against a dense solve with autodiff Jacobians.
    T = 36
    cell, xs, s0 = make(dtype, T)
    problem = _problem(cell, xs, s0)
    exact = jax.vmap(make_spec(s0).ravel)(scan_reference(cell, xs, s0))
    noise = jax.random.normal(jax.random.key(8), exact.shape, dtype)
    states = exact + jnp.asarray(0.02, dtype) * noise
    fs = problem.evaluate(states)
    solver = prnn.DEER()  # exact Jacobians on every cell

    step = eqx.filter_jit(lambda p, s, f: _newton_step(p, solver, p, s, f, 0.0, 0.0))
    monkeypatch.setattr(problem_module, "CHUNK_ELEMENTS", 0)
    assert _time_chunk(problem, solver, T) is None
    whole = step(problem, states, fs)
    monkeypatch.setattr(problem_module, "CHUNK_ELEMENTS", 48)
    assert _time_chunk(problem, solver, T) == 6
    step = eqx.filter_jit(lambda p, s, f: _newton_step(p, solver, p, s, f, 0.0, 0.0))  # retrace
    chunked = step(problem, states, fs)

    eps = float(jnp.finfo(dtype).eps)
    for a, b in zip(whole, chunked):  # candidate, f at it, max|δ|, max|candidate|
        assert a.dtype == b.dtype == dtype
        assert max_abs_diff(a, b) <= 4 * eps
    candidate, cand_fs, size, largest = chunked
    # Oracle: (I - subdiag(A_t)) δ = f - s with A_t = ∂f/∂s by jacfwd, one dense solve.
    prev = jnp.concatenate([problem.init[None], states[:-1]])
    A = jax.vmap(jax.jacfwd(problem.fn, argnums=1))(xs, prev)
    delta = np.linalg.solve(
        dense_bidiagonal(np.asarray(A, np.float64)), np.asarray(fs - states, np.float64).ravel()
    ).reshape(T, -1)
    assert np.max(np.abs(np.asarray(candidate - states, np.float64) - delta)) <= 10 * eps
    cand_prev = jnp.concatenate([problem.init[None], candidate[:-1]])
    assert max_abs_diff(cand_fs, jax.vmap(problem.fn)(xs, cand_prev)) <= 4 * eps
    assert abs(float(size) - np.max(np.abs(delta))) <= 10 * eps
    assert float(largest) == float(jnp.max(jnp.abs(candidate)))


def test_linear_recurrence_from_an_initial_value():
    # x_0 = v: the same as the recurrence from 0 with A_1 v added to b_1.
    k = jax.random.split(jax.random.key(9), 3)
    A, b, v = (jax.random.normal(k[0], (5, 3, 3)), jax.random.normal(k[1], (5, 3)),
               jax.random.normal(k[2], (3,)))  # fmt: skip
    shifted = b.at[0].add(A[0] @ v)
    got = linear_recurrence(A, b, method="sequential", initial=v)
    assert max_abs_diff(got, linear_recurrence(A, shifted, method="sequential")) <= 1e-14
    with pytest.raises(ValueError, match="initial"):
        linear_recurrence(A, b, method="associative", initial=v)


@pytest.mark.parametrize("make", [gru_problem, lstm_problem])
def test_globalised_deer_carries_the_linearisation_of_its_states(make):
    # The gated step splices the two proposals' values and Jacobians instead of
    # evaluating the cell at the spliced trajectory: they must be that evaluation.
    cell, xs, s0 = make(jnp.float64, 30)
    problem = _problem(cell, xs, s0)
    solver = prnn.DEER()
    guess = jnp.zeros((30, make_spec(s0).size), jnp.float64)
    it, state = solver.init(problem, guess)
    for frontier in (0, 1):
        it, state = solver.step(problem, it, state, jnp.array(frontier, jnp.int32))
        fs, jac = problem.linearise_exact(it.states)
        assert isinstance(jac, GatedJacobian) and isinstance(it.jac, GatedJacobian)
        assert max_abs_diff(it.fs, fs) <= 1e-14
        assert max_abs_diff(it.jac.dense(), jac.dense()) <= 1e-14
