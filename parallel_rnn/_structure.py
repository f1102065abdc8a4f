"""The structure of a cell's Jacobian, and where its closed forms come from.

A cell's Jacobian `∂new_state/∂state` is, in the flat state order,

- `"diagonal"`: `(D,)` per step;
- `"block"`: `D = k·n`, block-diagonal with `n` blocks of `k×k`, block `j` coupling
  the flat entries `j, n + j, …, (k-1)n + j` (for a state of `k` leaves of size `n`,
  like the LSTM's `(h, c)`, unit `j` of every leaf), stored as `(n, k, k)`;
- `"dense"`: `(D, D)`, or for gated cells the same matrix in the factored form of
  `_gated.py` (`GatedJacobian`, `O(D·K)` numbers per step).

The closed forms come from a registry keyed on the cell's class
(`register_jacobian`, which is how `eqx.nn.GRUCell` and `eqx.nn.LSTMCell` get theirs
without wrapping), else from the cell's own methods `value_and_diagonal_jacobian`,
`diagonal_jacobian`, `value_and_block_jacobian`, `value_and_jacobian`,
`value_and_gated_jacobian` and its class
attribute `jacobian_structure`. Whatever is missing falls back to autodiff.
"""

import functools
from collections.abc import Callable
from typing import Literal, NamedTuple

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, PyTree

from ._closure import closure_convert
from ._gated import blocks_to_diagonal as blocks_to_diagonal, check_gated
from ._problem import FlatCell, StateSpec
from ._validate import check_cell, check_jacobian


Structure = Literal["dense", "diagonal", "block"]
_STRUCTURES = ("dense", "diagonal", "block")


class JacobianRule(NamedTuple):
    """Closed forms for one class, each a function `(cell, input_t, state)`."""

    structure: Structure
    value_and_diagonal: Callable | None
    value_and_blocks: Callable | None
    value_and_jacobian: Callable | None
    value_and_gated: Callable | None = None


_REGISTRY: dict[type, JacobianRule] = {}


def register_jacobian(
    cls: type,
    *,
    structure: Structure = "dense",
    value_and_diagonal: Callable | None = None,
    value_and_blocks: Callable | None = None,
    value_and_jacobian: Callable | None = None,
    value_and_gated: Callable | None = None,
) -> None:
    """Give every instance of `cls` (and of its subclasses) closed-form Jacobians.

    For classes you cannot edit (`eqx.nn.GRUCell` and `eqx.nn.LSTMCell` are
    registered this way by `parallel_rnn.cells`). Each function takes
    `(cell, input_t, state)` and returns `(new_state, ...)`:

    - `value_and_diagonal`: the diagonal of `∂new_state/∂state`, a pytree like `state`;
    - `value_and_blocks`: the `k×k` diagonal blocks, an `(n, k, k)` array with
      `n·k = D`, block `j` acting on the flat entries `j, n+j, …, (k-1)n+j`;
    - `value_and_jacobian`: the `(D, D)` Jacobian of the flat state;
    - `value_and_gated`: that Jacobian as a `GatedJacobian` (weights shared by all
      steps, a few `(D,)` coefficient vectors per step), which `DEER` stores in
      `O(T·D·K)` and applies matrix-free on the sequential scan.

    `structure` declares the exact Jacobian's structure: `"diagonal"` (needs
    `value_and_diagonal`) or `"block"` (needs `value_and_blocks`) make `DEER` exact
    at `O(T·D)` (`O(T·D·k)`) memory; `"dense"` (the default) means the diagonal or
    blocks given are approximations, used by the quasi solvers. A later
    registration of the same class replaces the earlier one.
    """
    if not isinstance(cls, type):
        raise TypeError(f"`cls` must be a class; got {cls!r}")
    if structure not in _STRUCTURES:
        raise ValueError(f"`structure` must be one of {_STRUCTURES}; got {structure!r}")
    if structure == "diagonal" and value_and_diagonal is None:
        raise ValueError("`structure='diagonal'` needs `value_and_diagonal`")
    if structure == "block" and value_and_blocks is None:
        raise ValueError("`structure='block'` needs `value_and_blocks`")
    for name, f in [
        ("value_and_diagonal", value_and_diagonal),
        ("value_and_blocks", value_and_blocks),
        ("value_and_jacobian", value_and_jacobian),
        ("value_and_gated", value_and_gated),
    ]:
        if f is not None and not callable(f):
            raise TypeError(f"`{name}` must be callable; got {f!r}")
    _REGISTRY[cls] = JacobianRule(
        structure, value_and_diagonal, value_and_blocks, value_and_jacobian, value_and_gated
    )


def _unbound(cell, name: str) -> Callable | None:
    method = getattr(cell, name, None)
    return None if method is None else (lambda _, x, s: method(x, s))


def jacobian_rule(cell: Callable) -> JacobianRule:
    """The closed forms of `cell`: its class's registration, else its own methods."""
    for cls in type(cell).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    both = _unbound(cell, "value_and_diagonal_jacobian")
    diag = getattr(cell, "diagonal_jacobian", None)
    if both is None and diag is not None:
        both = lambda _, x, s: (cell(x, s), diag(x, s))  # noqa: E731
    structure = getattr(cell, "jacobian_structure", "dense")
    if structure not in _STRUCTURES:
        raise ValueError(
            f"`cell.jacobian_structure` must be one of {_STRUCTURES}; got {structure!r}"
        )
    return JacobianRule(
        structure,
        both,
        _unbound(cell, "value_and_block_jacobian"),
        _unbound(cell, "value_and_jacobian"),
        _unbound(cell, "value_and_gated_jacobian"),
    )


def dense_to_blocks(jac: Float[Array, "... D D"], k: int) -> Float[Array, "... n k k"]:
    """The `k×k` diagonal blocks (strided layout) of a dense `(D, D)` matrix."""
    D = jac.shape[-1]
    n = D // k
    J = jac.reshape(*jac.shape[:-2], k, n, k, n)  # [a, j, b, l] = J[a n + j, b n + l]
    return jnp.moveaxis(jnp.diagonal(J, axis1=-3, axis2=-1), -1, -3)  # (..., n, k, k)


def _jacobian_shape(f: Callable, name: str, x_t: PyTree, init_state: PyTree):
    """The abstract Jacobian part of a closed form `f(input_t, state) -> (new, jac)`."""
    try:
        return eqx.filter_eval_shape(f, x_t, init_state)[1]
    except Exception as e:
        raise TypeError(f"calling `{name}(input_t, state)` failed: {e}") from e


def _check_blocks(f: Callable, x_t: PyTree, init_state: PyTree, spec: StateSpec) -> None:
    name = "value_and_block_jacobian"
    blocks = _jacobian_shape(f, name, x_t, init_state)
    shape = getattr(blocks, "shape", None)
    if (
        shape is None
        or len(shape) != 3
        or shape[1] != shape[2]
        or shape[0] * shape[1] != spec.size
        or not jnp.issubdtype(blocks.dtype, jnp.floating)
    ):
        raise ValueError(
            f"`{name}` must return floating blocks of shape (n, k, k) with n·k = D = "
            f"{spec.size}; got {shape}"
        )


def flat_cell(cell: Callable, x_t: PyTree, init_state: PyTree, spec: StateSpec) -> FlatCell:
    """`cell` on flat `(D,)` states, with whatever closed-form Jacobians it has."""
    # Closure conversion turns whatever the cell closes over (parameters, tracers
    # of an outer jax.grad) into pytree leaves, so the custom JVP can return
    # their cotangents; plain closures would otherwise fail under differentiation.
    convert = lambda f: closure_convert(f, x_t, init_state)  # noqa: E731
    rule = jacobian_rule(cell)
    bind = lambda f: None if f is None else functools.partial(f, cell)  # noqa: E731
    both, blocks, dense, gated = map(  # pyright: ignore[reportAssignmentType]
        bind,
        (
            rule.value_and_diagonal,
            rule.value_and_blocks,
            rule.value_and_jacobian,
            rule.value_and_gated,
        ),
    )
    if both is None and blocks is not None:
        # The diagonal of the blocks serves the quasi solvers.
        def both(x, s, blocks=blocks):
            value, b = blocks(x, s)
            return value, spec.unravel(blocks_to_diagonal(b).astype(spec.dtype))

    diag = None
    if both is not None:
        only_diag = lambda x, s: both(x, s)[1]  # noqa: E731
        check_cell(only_diag, x_t, init_state, method="cell.diagonal_jacobian")
        diag, both = convert(only_diag), convert(both)
    if blocks is not None:
        _check_blocks(blocks, x_t, init_state, spec)
        blocks = convert(blocks)
    if dense is not None:
        check_jacobian(dense, x_t, init_state, spec)
        dense = convert(dense)
    if gated is not None:
        _check_gated(gated, x_t, init_state, spec)
        gated = convert(gated)
    return FlatCell(
        convert(cell),
        diag,
        spec,
        both,
        dense,
        blocks=blocks,
        gated=gated,
        structure=rule.structure,
    )


def _check_gated(f: Callable, x_t: PyTree, init_state: PyTree, spec: StateSpec) -> None:
    name = "value_and_gated_jacobian"
    check_gated(_jacobian_shape(f, name, x_t, init_state), spec.size, name)
