"""Trace-time checks of `solve_parallel`'s arguments, with messages that name them."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

from ._gated import check_gated
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


def check_cell(
    cell: Callable,
    x_t: PyTree,
    init_state: PyTree,
    method: str = "cell",
    inputs: PyTree | None = None,
) -> None:
    """The cell must map `init_state` to a state of the same structure, shapes and dtypes.

    With `inputs` (the whole sequence), a failing call is retried on the two usual
    layout mistakes to say which one it is.
    """
    if not callable(cell):
        raise TypeError(f"`{method}` must be callable as `cell(input_t, state)`; got {type(cell)}")
    try:
        got = eqx.filter_eval_shape(cell, x_t, init_state)
    except Exception as e:  # surface the user's error with our context
        hint = "" if inputs is None else _layout_hint(cell, inputs, init_state)
        raise TypeError(
            f"calling `{method}(input_t, state)` failed with input_t = {_describe(x_t)} and "
            f"state = {_describe(init_state)}: {e}{hint}"
        ) from e
    _check_like_state(got, init_state, method)


def _works(cell: Callable, x_t: PyTree, init_state: PyTree) -> bool:
    try:
        eqx.filter_eval_shape(cell, x_t, init_state)
    except Exception:
        return False
    return True


def _layout_hint(cell: Callable, inputs: PyTree, init_state: PyTree) -> str:
    """Why `cell(inputs[0], init_state)` may have failed: a batch, or time last."""
    leaves = jax.tree_util.tree_leaves(inputs)
    shapes = [tuple(jnp.shape(leaf)) for leaf in leaves]
    tm = jax.tree_util.tree_map
    if all(len(s) >= 2 for s in shapes):
        batch_x = tm(lambda x: jax.ShapeDtypeStruct(jnp.shape(x)[2:], jnp.result_type(x)), inputs)
        if _works(cell, batch_x, init_state):
            return (
                f"\nHint: the cell accepts inputs[0, 0], so `inputs` (leaf shapes {shapes}) "
                "looks like a batch (B, T, ...). `inputs` must be (T, ...) for one "
                "sequence; use jax.vmap over a batch, e.g. "
                "jax.vmap(lambda x: solve_parallel(cell, x, init_state))(inputs)."
            )
    if all(len(s) >= 2 for s in shapes):
        last_x = tm(lambda x: jax.ShapeDtypeStruct(jnp.shape(x)[:-1], jnp.result_type(x)), inputs)
        if _works(cell, last_x, init_state):
            return (
                f"\nHint: the cell accepts inputs[..., 0], so `inputs` (leaf shapes {shapes}) "
                "looks time-last (..., T). The time axis must come first: pass "
                "jnp.moveaxis(inputs, -1, 0)."
            )
    return ""


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


_WHAT = {
    "value_and_diagonal": "diagonal",
    "value_and_blocks": "blocks",
    "value_and_jacobian": "jacobian",
    "value_and_gated": "gated_jacobian",
}


def check_closed_form(
    f: Callable, name: str, kind: str, x_t: PyTree, init_state: PyTree, spec: StateSpec
) -> None:
    """A closed form `f(input_t, state) -> (new_state, J)` of kind `kind` (a
    `register_jacobian` keyword) must return a pair whose `new_state` is like
    `init_state` and whose `J` has the kind's shapes. `name` says where `f` comes
    from (the registered function, or the cell's method) for the messages."""
    what = _WHAT[kind]
    try:
        out = eqx.filter_eval_shape(f, x_t, init_state)
    except Exception as e:
        raise TypeError(
            f"calling {name} with input_t = {_describe(x_t)} and state = "
            f"{_describe(init_state)} failed: {e}"
        ) from e
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(f"{name} must return a pair (new_state, {what}); got {_describe(out)}")
    value, jac = out
    expected = _describe(init_state)
    _check_like(value, init_state, f"the new_state returned by {name}")
    D = spec.size
    if kind == "value_and_diagonal":
        _check_like(jac, init_state, f"the diagonal returned by {name}")
        return
    if kind == "value_and_gated":
        check_gated(jac, D, name)
        return
    shape = tuple(getattr(jac, "shape", ()))
    if kind == "value_and_blocks":
        ok = len(shape) == 3 and shape[1] == shape[2] and shape[0] * shape[1] == D
        want = f"of shape (n, k, k) with n·k = D = {D}"
    else:
        ok = shape == (D, D)
        want = f"of shape ({D}, {D}), the Jacobian of the flattened state (D = {D})"
    if not ok or not jnp.issubdtype(jac.dtype, jnp.floating):
        raise ValueError(
            f"the {what} returned by {name} must be a floating array {want}, for "
            f"init_state = {expected}; got {_describe(jac)}"
        )


def _check_like(got: PyTree, init_state: PyTree, subject: str) -> None:
    """`got` (shapes and dtypes) must match `init_state`; `subject` starts the message."""
    expected = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), init_state
    )
    same_structure = jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(expected)
    pairs = list(zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)))
    if not same_structure or any(tuple(getattr(g, "shape", ())) != e.shape for g, e in pairs):
        raise ValueError(
            f"{subject} must have the structure and shapes of `init_state` {expected}; got {got}"
        )
    if any(getattr(g, "dtype", None) != e.dtype for g, e in pairs):
        raise TypeError(f"{subject} must have the dtype of `init_state` {expected}; got {got}")


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


def _number(name: str, value, integer: bool):
    """A Python or NumPy scalar (or a concrete 0-d array) as a Python number."""
    if isinstance(value, jax.core.Tracer):  # pyright: ignore[reportAttributeAccessIssue]
        raise TypeError(
            f"`{name}` must be a static number (Python or NumPy scalar), not a traced "
            f"array; got {value!r}"
        )
    if isinstance(value, bool) or (hasattr(value, "dtype") and value.dtype == bool):
        raise TypeError(f"`{name}` must be a number, not a bool; got {value!r}")
    if isinstance(value, (np.ndarray, np.generic, jax.Array)) and np.ndim(value) == 0:
        value = value.item()
    kinds = (int,) if integer else (int, float)
    if not isinstance(value, kinds):
        kind = "an integer" if integer else "a number"
        raise TypeError(f"`{name}` must be {kind} (Python or NumPy scalar); got {value!r}")
    return value


def normalise_options(rtol, atol, max_steps) -> tuple[float | None, float | None, int | None]:
    """Check the options and turn NumPy scalars into Python ones (static under jit)."""
    out = []
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is not None:
            value = float(_number(name, value, integer=False))
            if not value >= 0:  # also refuses NaN
                raise ValueError(f"`{name}` must be a non-negative number or None; got {value!r}")
        out.append(value)
    if max_steps is not None:
        max_steps = _number("max_steps", max_steps, integer=True)
        if max_steps < 1:
            raise ValueError(f"`max_steps` must be a positive int or None; got {max_steps!r}")
    return out[0], out[1], max_steps  # pyright: ignore[reportReturnType]
