"""Batched cell evaluation: CPU chunking gives exactly what one `vmap` gives."""

import jax
import jax.numpy as jnp
import pytest

import parallel_rnn as prnn
from parallel_rnn import _problem

from .helpers import max_abs_diff, scan_reference


def test_chunk_size_is_a_divisor_of_T_near_the_target():
    # target = 2**16 // 16 = 4096 elements per state dimension
    assert _problem._chunk_size(100_000, 16) == 4000
    assert _problem._chunk_size(5000, 16) == 5000  # short sequences: one vmap
    assert _problem._chunk_size(100_003, 16) == 4096  # prime: a remainder chunk


@pytest.fixture
def tiny_chunks(monkeypatch):
    # 64 elements: chunks of 16 steps at D = 4, so short sequences get chunked too.
    monkeypatch.setattr(_problem, "_CPU_CHUNK_ELEMENTS", 64)


@pytest.mark.parametrize("T", [96, 101], ids=["divisible", "remainder"])
def test_map_steps_in_chunks_equals_vmap(tiny_chunks, T):
    if jax.default_backend() != "cpu":
        pytest.skip("chunking is CPU-only")
    xs = jax.random.normal(jax.random.key(0), (T, 3))
    ss = jax.random.normal(jax.random.key(1), (T, 4))

    def fn(x, s):
        return jnp.tanh(s * x.sum()), (s**2, x[:1])

    got = _problem.map_steps(fn, xs, ss, width=4)
    assert max_abs_diff(got, jax.vmap(fn)(xs, ss)) == 0.0


@pytest.mark.parametrize("solver", [prnn.QuasiDEER(), prnn.Jacobi()], ids=["QuasiDEER", "Jacobi"])
def test_solve_with_chunked_evaluation_matches_scan_and_gradient(tiny_chunks, solver):
    # T = 211 (prime), D = 4: chunks of 16 steps plus a remainder, forward and adjoint.
    cell = prnn.cells.GRU(3, 4, key=jax.random.key(2))
    xs = jax.random.normal(jax.random.key(3), (211, 3))
    h0 = jnp.zeros(4)
    sol = prnn.solve_parallel(cell, xs, h0, solver)
    assert max_abs_diff(sol.states, scan_reference(cell, xs, h0)) < 1e-8

    def loss(xs, solve):
        return jnp.sum(jnp.sin(solve(xs)))

    g = jax.grad(loss)(xs, lambda x: prnn.solve_parallel(cell, x, h0, solver).states)
    ref = jax.grad(loss)(xs, lambda x: scan_reference(cell, x, h0))
    assert max_abs_diff(g, ref) < 1e-7
