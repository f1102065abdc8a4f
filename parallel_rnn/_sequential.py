"""`solve_sequential`: the reference, one step after another with `lax.scan`."""

from collections.abc import Callable

import equinox as eqx
import jax
from jaxtyping import PyTree


@eqx.filter_jit
def solve_sequential(cell: Callable, inputs: PyTree, init_state: PyTree) -> PyTree:
    """Evaluate `s_t = cell(x_t, s_{t-1})` for `t = 1..T` with `jax.lax.scan`.

    **Returns:** the states `s_1..s_T`, a pytree like `init_state` whose leaves have a
    leading time axis `T`.
    """

    def step(state, x_t):
        new = cell(x_t, state)
        return new, new

    _, states = jax.lax.scan(step, init_state, inputs)
    return states
