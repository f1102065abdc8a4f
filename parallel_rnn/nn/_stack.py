"""`Stack`: blocks applied one after another."""

from collections.abc import Sequence

import equinox as eqx
import jax
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from ._block import Block
from ._layer import LayerResult


class Stack(eqx.Module):
    """Blocks applied in order; each layer is one parallel solve, so a call costs the
    sum of the layers' iterations (`LayerResult.num_steps` of each).

    **Arguments:** `blocks`, a sequence of [`parallel_rnn.nn.Block`][].

    **Calling:** `stack(x, *, lengths=None, guesses=None, key=None, inference=None)`
    with `x` `(T, width)` or `(B, T, width)`; `guesses` is a list with one warm start
    per block (an entry may be `None`), typically the `states` of the previous call's
    results for the same examples; `key` is split over the blocks' dropouts. Returns
    `(y, results)`, `results` a list of one `LayerResult` per block.
    """

    blocks: tuple[Block, ...]

    def __init__(self, blocks: Sequence[Block]):
        blocks = tuple(blocks)
        if not blocks or not all(isinstance(b, Block) for b in blocks):
            raise TypeError("`blocks` must be a non-empty sequence of parallel_rnn.nn.Block")
        self.blocks = blocks

    def __call__(
        self,
        x: Float[Array, "*B T W"],
        *,
        lengths: Int[Array, "*B"] | int | None = None,
        guesses: Sequence[PyTree | None] | None = None,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> tuple[Array, list[LayerResult]]:
        n = len(self.blocks)
        if guesses is None:
            guesses = [None] * n
        if len(guesses) != n:
            raise ValueError(f"`guesses` must have one entry per block ({n}); got {len(guesses)}")
        keys = [None] * n if key is None else list(jax.random.split(key, n))
        results = []
        for block, guess, k in zip(self.blocks, guesses, keys):
            x, result = block(x, lengths=lengths, guess=guess, key=k, inference=inference)
            results.append(result)
        return x, results
