"""`Block`: a recurrent layer with normalisation, projection, dropout and a residual."""

from collections.abc import Callable
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from ._bidirectional import Bidirectional
from ._layer import RNN, LayerResult, check_lengths, zero_padding, zero_state


def per_step(f: Callable, x: Array) -> Array:
    """`f` on each vector `x[..., :]` (over every leading axis)."""
    flat = x.reshape(-1, x.shape[-1])
    out = jax.vmap(f)(flat)
    return out.reshape(*x.shape[:-1], out.shape[-1])


class Block(eqx.Module):
    """`y = x + dropout(projection(layer(norm(x))))`, zero past each sequence's length.

    The pre-norm residual block of ParaRNN-style language models (and of most
    recurrent and state-space stacks). The cell's own input weights project the
    normalised input into the recurrence; `projection` maps the layer's outputs back
    to the model width.

    **Arguments:**

    - `layer`: an [`parallel_rnn.nn.RNN`][] or [`parallel_rnn.nn.Bidirectional`][]
      reading vectors of size `width`.
    - `width`: the model width (the size of `x`'s last axis).
    - `key`: for the projection's initial weights.
    - `norm`: `"layer"` (`eqx.nn.LayerNorm`, the default), `"rms"`
      (`eqx.nn.RMSNorm`), `None`, or any module mapping a `(width,)` vector to one.
    - `projection`: add a `Linear` from the layer's output size to `width` (default
      True; with False the output size must be `width`).
    - `dropout`: the dropout rate on the projected outputs (default 0).
    - `residual`: add `x` (default True).

    **Calling:** `block(x, *, lengths=None, guess=None, key=None, inference=None)`,
    `x` `(T, width)` or `(B, T, width)`; `key` drives dropout (needed when training
    with `dropout > 0`), `inference=True` turns dropout off. Returns
    `(y, LayerResult)`.
    """

    layer: RNN | Bidirectional
    norm: Callable | None
    projection: eqx.nn.Linear | None
    dropout: eqx.nn.Dropout
    residual: bool = eqx.field(static=True)

    def __init__(
        self,
        layer: RNN | Bidirectional,
        width: int,
        *,
        key: PRNGKeyArray,
        norm: Literal["layer", "rms"] | Callable | None = "layer",
        projection: bool = True,
        dropout: float = 0.0,
        residual: bool = True,
    ):
        if not isinstance(layer, (RNN, Bidirectional)):
            raise TypeError(f"`layer` must be an nn.RNN or nn.Bidirectional; got {type(layer)}")
        self.layer = layer
        if norm == "layer":
            norm = eqx.nn.LayerNorm(width)
        elif norm == "rms":
            norm = eqx.nn.RMSNorm(width)
        elif isinstance(norm, str):
            raise ValueError(f"`norm` must be 'layer', 'rms', None or a module; got {norm!r}")
        self.norm = norm
        out_size = _output_size(layer, jnp.zeros((width,), _dtype(layer)))
        if projection:
            self.projection = eqx.nn.Linear(out_size, width, key=key, dtype=_dtype(layer))
        else:
            if residual and out_size != width:
                raise ValueError(
                    f"the layer's outputs have size {out_size}, not the width {width}: "
                    "a residual block without projection needs them equal"
                )
            self.projection = None
        self.dropout = eqx.nn.Dropout(dropout)
        self.residual = bool(residual)

    def __call__(
        self,
        x: Float[Array, "*B T W"],
        *,
        lengths: Int[Array, "*B"] | int | None = None,
        guess: PyTree | None = None,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> tuple[Array, LayerResult]:
        if key is None and _dropout_active(self.dropout, inference):
            # Before the solve is traced (Dropout would only say so after it).
            raise RuntimeError(
                f"this Block has dropout {self.dropout.p}: pass `key=` to train, or "
                "`inference=True` to evaluate"
            )
        if lengths is not None:
            lengths = check_lengths(lengths, x.shape)
        h = x if self.norm is None else per_step(self.norm, x)
        h, result = self.layer(h, lengths=lengths, guess=guess)
        if self.projection is not None:
            h = per_step(self.projection, h)
        h = self.dropout(h, key=key, inference=inference)
        y = x + h if self.residual else h
        if lengths is not None:
            y = zero_padding(y, lengths)
        return y, result


def _output_size(layer: RNN | Bidirectional, x_t: Array) -> int:
    """The size of the layer's outputs for inputs like `x_t` (from the readout of a
    zero state, without tracing a solve)."""
    if isinstance(layer, Bidirectional):
        return _output_size(layer.forward, x_t) + _output_size(layer.backward, x_t)
    s0 = zero_state(layer.cell, x_t)
    return eqx.filter_eval_shape(layer.readout, s0).shape[-1]


def _dtype(layer: RNN | Bidirectional):
    """The floating dtype of the layer's parameters (the first one found)."""
    leaves = [a for a in jax.tree_util.tree_leaves(layer) if eqx.is_inexact_array(a)]
    return leaves[0].dtype if leaves else jnp.float32


def _dropout_active(dropout: eqx.nn.Dropout, inference: bool | None) -> bool:
    """Whether `dropout` would draw a mask (and so need a key), as `eqx.nn.Dropout`
    decides it."""
    inference = dropout.inference if inference is None else inference
    return not inference and not (isinstance(dropout.p, (int, float)) and dropout.p == 0)
