"""The shipped trained models load and evaluate sequentially to finite, reproducible states."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import parallel_rnn as prnn

from .helpers import max_abs_diff
from .trained import ar_gru3, char_lstm_small


# One compilation per model and dtype, shared by the repeated evaluation.
_sequential = eqx.filter_jit(prnn.solve_sequential)
MODELS = {"ar_gru3": (ar_gru3, 2000, 4), "char_lstm_small": (char_lstm_small, 1000, 48)}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_shipped_model_sequential_states_are_finite_and_reproducible(name, dtype):
    make, T, D = MODELS[name]
    cell, xs, s0 = make(dtype)
    assert xs.shape[0] == T and xs.dtype == dtype
    assert sum(np.size(leaf) for leaf in jax.tree.leaves(s0)) == D
    states = _sequential(cell, xs, s0)
    again = _sequential(*make(dtype))
    for leaf in jax.tree.leaves(states):
        assert leaf.shape[0] == T and leaf.dtype == dtype
        assert bool(jnp.all(jnp.isfinite(leaf)))
    assert max_abs_diff(states, again) == 0.0


def test_shipped_ar_model_is_marginally_stable_and_not_constant():
    # The property that makes it a hard case: LLE ≈ 0 along a trajectory that moves.
    cell, xs, s0 = ar_gru3(jnp.float64)
    states = _sequential(cell, xs, s0)
    assert float(jnp.std(states[:, 0])) > 0.1
    lle = prnn.lyapunov_exponent(cell, xs, states, s0, key=jax.random.key(0))
    assert abs(float(lle)) < 0.05
