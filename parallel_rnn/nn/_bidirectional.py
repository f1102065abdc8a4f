"""`Bidirectional`: two layers reading the sequence in opposite directions."""

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Float, Int, PyTree

from ._layer import RNN, LayerResult


class Bidirectional(eqx.Module):
    """A forward and a reverse [`parallel_rnn.nn.RNN`][], outputs concatenated on the
    last axis (forward first).

    **Arguments:** `forward` (an `RNN` with `reverse=False`) and `backward` (an `RNN`
    with `reverse=True`, usually with a cell of its own); their solvers and options
    may differ.

    **Calling:** as `RNN`; `init_state` and `guess`, when given, are pairs
    `(forward, backward)`. The `LayerResult` has `states = (forward, backward)` (pass
    it back whole as `guess=`) and flags with a trailing axis of 2 (forward, backward).
    The reverse layer starts at each sequence's own last valid step.
    """

    forward: RNN
    backward: RNN

    def __check_init__(self):
        if not isinstance(self.forward, RNN) or not isinstance(self.backward, RNN):
            raise TypeError("`forward` and `backward` must be parallel_rnn.nn.RNN layers")
        if self.forward.reverse or not self.backward.reverse:
            raise ValueError(
                "`forward` must have reverse=False and `backward` reverse=True; got "
                f"{self.forward.reverse} and {self.backward.reverse}"
            )

    def __call__(
        self,
        inputs: Float[Array, "*B T M"],
        *,
        lengths: Int[Array, "*B"] | int | None = None,
        init_state: tuple[PyTree, PyTree] | None = None,
        guess: tuple[PyTree, PyTree] | None = None,
    ) -> tuple[Array, LayerResult]:
        s0 = _pair(init_state, "init_state")
        g = _pair(guess, "guess")
        y_f, r_f = self.forward(inputs, lengths=lengths, init_state=s0[0], guess=g[0])
        y_b, r_b = self.backward(inputs, lengths=lengths, init_state=s0[1], guess=g[1])
        flags = jtu.tree_map(
            lambda a, b: jnp.stack([a, b], axis=-1),
            (r_f.num_steps, r_f.converged, r_f.fell_back, r_f.residual),
            (r_b.num_steps, r_b.converged, r_b.fell_back, r_b.residual),
        )
        return jnp.concatenate([y_f, y_b], axis=-1), LayerResult((r_f.states, r_b.states), *flags)


def _pair(value, name: str) -> tuple:
    """`(forward, backward)` from a pair (or `(None, None)` from None)."""
    if value is None:
        return (None, None)
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(
            f"`{name}` of a Bidirectional layer must be a pair (forward, backward), "
            f"like its `LayerResult.states`; got {type(value).__name__}"
        )
    return tuple(value)
