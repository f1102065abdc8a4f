"""Shared test utilities. Oracles here never call the library's solvers."""

import jax
import jax.numpy as jnp


def scan_reference(cell, inputs, init_state):
    """Sequential evaluation written independently of `parallel_rnn.solve_sequential`."""

    def step(state, x_t):
        new = cell(x_t, state)
        return new, new

    return jax.lax.scan(step, init_state, inputs)[1]


def max_abs_diff(a, b) -> float:
    diffs = jax.tree_util.tree_map(lambda x, y: jnp.max(jnp.abs(x - y)), a, b)
    return float(max(jax.tree_util.tree_leaves(diffs)))
