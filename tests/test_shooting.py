"""MultipleShooting against lax.scan and BPTT: values, the <= P bound, jit/vmap."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import parallel_rnn as prnn

from .helpers import gru_problem, lstm_problem, max_abs_diff, scan_reference


T = 60
ERR = {jnp.float32: 1e-4, jnp.float64: 1e-9}


@pytest.mark.parametrize(
    "solver, dtype",
    [
        (prnn.MultipleShooting(), jnp.float32),
        (prnn.MultipleShooting(), jnp.float64),
        (prnn.MultipleShooting(chunk=7, solver=prnn.QuasiDEER()), jnp.float64),
        (prnn.MultipleShooting(chunk=16, solver=prnn.ELK()), jnp.float32),
        (prnn.MultipleShooting(chunk=12, solver=prnn.DEER(globalise="picard")), jnp.float32),
        (prnn.MultipleShooting(chunk=10, rank=3), jnp.float32),
        (prnn.MultipleShooting(chunk=10, rank=3), jnp.float64),
        (prnn.DEER(globalise="picard"), jnp.float64),
    ],
    ids=[
        "DEER-f32",
        "DEER-f64",
        "QuasiDEER-L7-f64",
        "ELK-L16-f32",
        "picard-L12-f32",
        "rank3-f32",
        "rank3-f64",
        "picard",
    ],  # fmt: skip
)
def test_matches_sequential_scan_on_a_pytree_state(solver, dtype):
    cell, xs, s0 = lstm_problem(dtype, T)
    sol = prnn.solve_parallel(cell, xs, s0, solver)
    assert bool(sol.converged)
    for leaf in jax.tree_util.tree_leaves(sol.states):
        assert leaf.dtype == dtype
    assert max_abs_diff(sol.states, scan_reference(cell, xs, s0)) < ERR[dtype]


@pytest.mark.parametrize(
    "globalise, rank", [(True, None), (False, None), ("picard", None), ("picard", 2)]
)
def test_at_most_p_iterations_on_a_chaotic_cell(globalise, rank):
    # weight_hh x 6: an unstable GRU whose Newton steps explode from a cold start.
    cell, xs, s0 = gru_problem(jnp.float64, T, scale=6.0)
    L = 8
    P = -(-T // L)  # the last chunk is padded
    solver = prnn.MultipleShooting(chunk=L, solver=prnn.DEER(globalise=globalise), rank=rank)
    sol = prnn.solve_parallel(cell, xs, s0, solver, max_steps=P)
    assert bool(sol.converged) and 1 <= int(sol.num_steps) <= P
    assert bool(jnp.all(jnp.isfinite(sol.states)))
    assert max_abs_diff(sol.states, scan_reference(cell, xs, s0)) < 1e-9


def test_low_rank_chunk_jacobian_is_exact_up_to_its_rank_and_a_projection_beyond():
    # f(x, s) = tanh(U V s + x): every step's Jacobian, hence the chunk map's, has
    # rank <= 2, so two probes recover it exactly (float64, jacfwd as the oracle).
    from parallel_rnn._problem import FlatCell, make_spec  # noqa: PLC0415
    from parallel_rnn._solver.shooting import _ChunkMap  # noqa: PLC0415

    D, L, k = 6, 9, 2
    ku, kv, kx, ks = jax.random.split(jax.random.key(3), 4)
    U = jax.random.normal(ku, (D, k), jnp.float64)
    V = jax.random.normal(kv, (k, D), jnp.float64)
    xs = jax.random.normal(kx, (L, D), jnp.float64)
    s0 = 0.3 * jax.random.normal(ks, (D,), jnp.float64)
    flat = FlatCell(lambda x, s: jnp.tanh(U @ (V @ s) + x), None, make_spec(s0))
    probed = lambda key, r: _ChunkMap(flat, None, jax.random.normal(key, (D, r), jnp.float64))
    chunk = probed(jax.random.key(5), 2)
    exact = jax.jacfwd(lambda e: chunk(xs, e))(s0)
    for r, probes_key in [(2, 5), (4, 6)]:
        end, approx = probed(jax.random.key(probes_key), r).value_and_low_rank_jacobian(xs, s0)
        assert max_abs_diff(end, chunk(xs, s0)) < 1e-14
        assert max_abs_diff(approx, exact) < 1e-12
    # Rank 1 of a rank-2 map: an orthogonal projection of J, so never closer than
    # its second singular value (Eckart-Young), and no further than J itself.
    _, approx = probed(jax.random.key(7), 1).value_and_low_rank_jacobian(xs, s0)
    sigma = jnp.linalg.svd(exact, compute_uv=False)
    gap = jnp.linalg.norm(approx - exact, 2)
    assert sigma[1] * (1 - 1e-9) <= gap <= sigma[0]


def test_one_chunk_is_the_sequential_scan():
    cell, xs, s0 = gru_problem(jnp.float64, T)
    sol = prnn.solve_parallel(cell, xs, s0, prnn.MultipleShooting(chunk=T))
    assert int(sol.num_steps) == 0 and bool(sol.converged)
    assert max_abs_diff(sol.states, scan_reference(cell, xs, s0)) < 1e-12


@pytest.mark.parametrize("rank", [None, 2])
def test_jit_and_vmap_give_each_sequence_its_own_answer(rank):
    cell, xs, s0 = gru_problem(jnp.float32, T)
    batch = jnp.stack([xs, 3 * xs[::-1], 0.1 * xs])

    @jax.jit
    def solve(x):
        return prnn.solve_parallel(cell, x, s0, prnn.MultipleShooting(chunk=9, rank=rank)).states

    out = jax.vmap(solve)(batch)
    for i in range(batch.shape[0]):
        assert max_abs_diff(out[i], scan_reference(cell, batch[i], s0)) < ERR[jnp.float32]


def test_gradient_equals_bptt():
    cell, xs, s0 = gru_problem(jnp.float64, T, scale=2.0)
    solver = prnn.MultipleShooting(chunk=10)

    def loss(c, x, h, solve):
        return jnp.sum(jnp.sin(solve(c, x, h)))

    par = lambda c, x, h: prnn.solve_parallel(c, x, h, solver).states
    g = eqx.filter_grad(loss)(cell, xs, s0, par)
    g_ref = eqx.filter_grad(loss)(cell, xs, s0, scan_reference)
    assert max_abs_diff(g, g_ref) < 1e-8
    gx = jax.grad(loss, argnums=(1, 2))(cell, xs, s0, par)
    gx_ref = jax.grad(loss, argnums=(1, 2))(cell, xs, s0, scan_reference)
    assert max_abs_diff(gx, gx_ref) < 1e-8


def test_bad_options_fail_at_construction():
    with pytest.raises(ValueError, match="`chunk`"):
        prnn.MultipleShooting(chunk=0)
    with pytest.raises(ValueError, match="`rank`"):
        prnn.MultipleShooting(rank=0)
    with pytest.raises(TypeError, match="`solver`"):
        prnn.MultipleShooting(solver=prnn.MultipleShooting())
    with pytest.raises(ValueError, match="`globalise`"):
        prnn.DEER(globalise="diagonal")  # pyright: ignore[reportArgumentType]
