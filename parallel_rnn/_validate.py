"""Trace-time checks of `solve_parallel`'s arguments, with messages that name them."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PyTree

from ._problem import StateSpec, make_spec


def _describe(tree: PyTree) -> str:
    return str(
        jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree
        )
    )


def check_inputs(inputs: PyTree) -> int:
    """Return `T`, the shared leading axis of every leaf of `inputs`."""
    leaves = jax.tree_util.tree_leaves(inputs)
    if not leaves:
        raise ValueError("`inputs` must contain at least one array (leading axis = time).")
    shapes = [jnp.shape(leaf) for leaf in leaves]
    if any(len(s) == 0 for s in shapes):
        raise ValueError(
            f"every leaf of `inputs` needs a leading time axis; got leaf shapes {shapes}"
        )
    lengths = {s[0] for s in shapes}
    if len(lengths) != 1:
        raise ValueError(
            f"all leaves of `inputs` must share the leading time axis T; got leaf shapes {shapes}"
        )
    (T,) = lengths
    if T == 0:
        raise ValueError(f"`inputs` has T == 0 time steps (leaf shapes {shapes}); need T >= 1.")
    return T


def check_state(init_state: PyTree) -> StateSpec:
    leaves = jax.tree_util.tree_leaves(init_state)
    if not leaves:
        raise ValueError("`init_state` must contain at least one floating-point array.")
    for leaf in leaves:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(
                "`init_state` must have floating-point leaves (the solvers differentiate "
                f"the cell with respect to the state); got {_describe(init_state)}"
            )
    if len({jnp.result_type(leaf) for leaf in leaves}) != 1:
        raise TypeError(
            f"all leaves of `init_state` must share one dtype; got {_describe(init_state)}"
        )
    return make_spec(init_state)


def check_cell(cell: Callable, x_t: PyTree, init_state: PyTree, method: str = "cell") -> None:
    """The cell must map `init_state` to a state of the same structure, shapes and dtypes."""
    if not callable(cell):
        raise TypeError(f"`{method}` must be callable as `cell(input_t, state)`; got {type(cell)}")
    try:
        got = eqx.filter_eval_shape(cell, x_t, init_state)
    except Exception as e:  # surface the user's error with our context
        raise TypeError(
            f"calling `{method}(input_t, state)` failed with input_t = {_describe(x_t)} and "
            f"state = {_describe(init_state)}: {e}"
        ) from e
    _check_like_state(got, init_state, method)


def _check_like_state(got: PyTree, init_state: PyTree, method: str) -> None:
    """`got` (shapes and dtypes) must match `init_state` in structure, shapes, dtype."""
    expected = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), init_state
    )
    if jax.tree_util.tree_structure(got) != jax.tree_util.tree_structure(expected):
        raise ValueError(
            f"`{method}` must return a state with the structure of `init_state`; "
            f"init_state is {expected} but {method}(input_t, init_state) returned {got}"
        )
    for g, e in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)):
        if g.shape != e.shape:
            raise ValueError(
                f"`{method}` changes the state's shapes: init_state is {expected} but "
                f"{method}(input_t, init_state) returned {got}"
            )
        if g.dtype != e.dtype:
            raise TypeError(
                f"`{method}` changes the state's dtype: init_state is {expected} but "
                f"{method}(input_t, init_state) returned {got}"
            )


def check_jacobian(method: Callable, x_t: PyTree, init_state: PyTree, spec: StateSpec) -> None:
    """`cell.value_and_jacobian` must return `(new_state, (D, D) array)`."""
    name = "cell.value_and_jacobian"
    try:
        value, jac = eqx.filter_eval_shape(method, x_t, init_state)
    except Exception as e:
        raise TypeError(
            f"calling `{name}(input_t, state)` failed, or did not return a pair "
            f"(new_state, jacobian), with input_t = {_describe(x_t)} and "
            f"state = {_describe(init_state)}: {e}"
        ) from e
    _check_like_state(value, init_state, name)
    D = spec.size
    if not hasattr(jac, "shape") or tuple(jac.shape) != (D, D):
        raise ValueError(
            f"`{name}` must return the Jacobian of the flattened state as a ({D}, {D}) "
            f"array (D = total size of `init_state` = {D}); got {_describe(jac)}"
        )
    if not jnp.issubdtype(jac.dtype, jnp.floating):
        raise TypeError(f"`{name}` must return a floating Jacobian; got {_describe(jac)}")


def check_guess(guess: PyTree, init_state: PyTree, T: int) -> None:
    want = jax.tree_util.tree_map(lambda x: (T, *jnp.shape(x)), init_state)
    if jax.tree_util.tree_structure(guess) != jax.tree_util.tree_structure(init_state):
        raise ValueError(
            "`guess` must have the structure of `init_state` with a leading time axis "
            f"T={T} on every leaf; expected shapes {want}, got {_describe(guess)}"
        )
    got = jax.tree_util.tree_map(jnp.shape, guess)
    for g, w in zip(
        jax.tree_util.tree_leaves(got, is_leaf=lambda x: isinstance(x, tuple)),
        jax.tree_util.tree_leaves(want, is_leaf=lambda x: isinstance(x, tuple)),
    ):
        if tuple(g) != tuple(w):
            raise ValueError(
                f"`guess` has the wrong shape: expected leaf shapes {want} (leading axis "
                f"T={T}), got {got}"
            )
    for leaf in jax.tree_util.tree_leaves(guess):
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(f"`guess` must have floating-point leaves; got {_describe(guess)}")


def check_options(rtol, atol, max_steps) -> None:
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is not None and not (isinstance(value, (int, float)) and value >= 0):
            raise ValueError(f"`{name}` must be a non-negative number or None; got {value!r}")
    if max_steps is not None and not (isinstance(max_steps, int) and max_steps >= 1):
        raise ValueError(f"`max_steps` must be a positive int or None; got {max_steps!r}")
