"""Chunked batched evaluation (`_problem.batched`) and DEER's spliced linearisation."""

import jax
import jax.numpy as jnp
import pytest

import parallel_rnn as prnn
import parallel_rnn._problem as problem_module
from parallel_rnn._gated import GatedJacobian
from parallel_rnn._problem import Problem, make_spec
from parallel_rnn._structure import flat_cell, registered_rule

from .helpers import gru_problem, lstm_problem, max_abs_diff, scan_reference


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
