"""`lyapunov_exponent` on systems whose exponent is known or independently computed."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import parallel_rnn as prnn


T = 400
D = 4


def _linear_map(eigs, seed=0):
    """`M = Q diag(eigs) Qᵀ`: symmetric, so its LLE is `log max|eig|` exactly."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(eigs), len(eigs))))
    return jnp.asarray(q @ np.diag(eigs) @ q.T)


class Linear(eqx.Module):
    m: jax.Array

    def __call__(self, x, s):
        return self.m @ s + x


class Elman(eqx.Module):
    """`s' = tanh(W s + U x)` with `W ~ N(0, gain²/D)`."""

    w: jax.Array
    u: jax.Array

    def __init__(self, gain, dim, key):
        kw, ku = jax.random.split(key)
        self.w = gain * jax.random.normal(kw, (dim, dim)) / jnp.sqrt(dim)
        self.u = jax.random.normal(ku, (dim, dim)) / jnp.sqrt(dim)

    def __call__(self, x, s):
        return jnp.tanh(self.w @ s + self.u @ x)


class MeanField(eqx.Module):
    """`s' = W tanh(s) + x`, zero-diagonal `W ~ N(0, gain²/D)` (Predictability Fig 2)."""

    w: jax.Array

    def __init__(self, gain, dim, key):
        w = gain * jax.random.normal(key, (dim, dim)) / jnp.sqrt(dim)
        self.w = w * (1 - jnp.eye(dim))

    def __call__(self, x, s):
        return self.w @ jnp.tanh(s) + x


_sequential = eqx.filter_jit(prnn.solve_sequential)


def _trajectory(cell, dim, length=T, seed=1, scale=0.1):
    xs = scale * jax.random.normal(jax.random.key(seed), (length, dim))
    s0 = jnp.zeros(dim)
    return xs, _sequential(cell, xs, s0), s0


def _dense_oracle(cell, xs, states, s0):
    """`(1/T) log σ_max(J_T ⋯ J_1)` with explicit Jacobians, renormalised in numpy."""
    prev = jnp.concatenate([s0[None], states[:-1]])
    jacs = np.asarray(jax.vmap(jax.jacfwd(cell, argnums=1))(xs, prev))
    prod, log_scale = np.eye(len(s0)), 0.0
    for jac in jacs:
        prod = jac @ prod
        n = np.linalg.norm(prod, 2)
        prod, log_scale = prod / n, log_scale + np.log(n)
    return log_scale / len(jacs)


@pytest.mark.parametrize("eigs", [(0.9, -0.5, 0.3, 0.1), (-1.3, 0.8, 0.2, 0.0)])
def test_linear_map_lle_is_log_spectral_radius(eigs):
    cell = Linear(_linear_map(eigs))
    xs, states, s0 = _trajectory(cell, D)
    lle = prnn.lyapunov_exponent(cell, xs, states, s0, key=jax.random.key(3))
    # The transient costs log|<v_0, q_max>| / T, a few 1e-3 at T = 400.
    assert abs(float(lle) - np.log(max(abs(e) for e in eigs))) < 0.02


def test_pytree_state_matches_flat_state():
    m = _linear_map((0.7, 0.6, -0.95, 0.2))
    flat = Linear(m)

    def tree_cell(x, s):
        out = m @ jnp.concatenate([s["a"], s["b"]]) + x
        return {"a": out[:1], "b": out[1:]}

    xs, states, s0 = _trajectory(flat, D, length=50)
    tree_states = {"a": states[:, :1], "b": states[:, 1:]}
    tree_s0 = {"a": s0[:1], "b": s0[1:]}
    key = jax.random.key(4)
    got = prnn.lyapunov_exponent(tree_cell, xs, tree_states, tree_s0, key=key)
    want = prnn.lyapunov_exponent(flat, xs, states, s0, key=key)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_elman_contractive_negative_and_expanding_positive():
    dim = 32
    calm = Elman(0.5, dim, jax.random.key(0))
    wild = Elman(3.0, dim, jax.random.key(0))
    xs, calm_states, s0 = _trajectory(calm, dim, scale=0.5)
    _, wild_states, _ = _trajectory(wild, dim, scale=0.5)
    calm_lle = prnn.lyapunov_exponent(calm, xs, calm_states, s0)
    wild_lle = prnn.lyapunov_exponent(wild, xs, wild_states, s0)
    assert calm_lle < -0.3
    assert wild_lle > 0.1


def test_mean_field_sign_follows_gain():
    dim = 32
    lles = []
    for gain in (0.5, 2.5):
        cell = MeanField(gain, dim, jax.random.key(2))
        xs, states, s0 = _trajectory(cell, dim, scale=0.01)
        lles.append(float(prnn.lyapunov_exponent(cell, xs, states, s0)))
    assert lles[0] < 0 < lles[1]


def test_matches_dense_jacobian_product():
    dim = 6
    cell = Elman(2.0, dim, jax.random.key(5))
    xs, states, s0 = _trajectory(cell, dim, length=150)
    lle = prnn.lyapunov_exponent(cell, xs, states, s0, key=jax.random.key(6))
    # Both are finite-time estimates of the same limit; they differ by O(1/T).
    assert abs(float(lle) - _dense_oracle(cell, xs, states, s0)) < 0.05


def test_jit_vmap_and_float32():
    dim = 8
    cell = Elman(0.5, dim, jax.random.key(7))
    xs = 0.1 * jax.random.normal(jax.random.key(8), (3, 64, dim), jnp.float32)
    s0 = jnp.zeros(dim, jnp.float32)
    cell32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), cell)
    states = jax.vmap(lambda x: prnn.solve_sequential(cell32, x, s0))(xs)
    batched = jax.jit(jax.vmap(lambda x, s: prnn.lyapunov_exponent(cell32, x, s, s0)))
    lles = batched(xs, states)
    assert lles.shape == (3,) and lles.dtype == jnp.float32
    one = prnn.lyapunov_exponent(cell32, xs[1], states[1], s0)
    np.testing.assert_allclose(lles[1], one, rtol=1e-5)


def test_zero_jacobian_is_finite_and_very_negative():
    xs = jnp.ones((10, 3))
    s0 = jnp.zeros(3)
    cell = lambda x, s: x
    lle = prnn.lyapunov_exponent(cell, xs, prnn.solve_sequential(cell, xs, s0), s0)
    assert jnp.isfinite(lle) and lle < -100


def test_wrong_states_shape_is_a_value_error():
    cell = Linear(jnp.eye(2))
    with pytest.raises(ValueError, match="`states`"):
        prnn.lyapunov_exponent(cell, jnp.ones((5, 2)), jnp.ones((4, 2)), jnp.zeros(2))
