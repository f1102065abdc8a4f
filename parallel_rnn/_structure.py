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
import jax
import jax.extend.core as jex
import jax.numpy as jnp
from jaxtyping import Array, Float, PyTree

from ._closure import closure_convert
from ._gated import blocks_to_diagonal as blocks_to_diagonal
from ._problem import FlatCell, StateSpec
from ._validate import check_closed_form


Structure = Literal["dense", "diagonal", "block"]
_STRUCTURES = ("dense", "diagonal", "block")


class JacobianRule(NamedTuple):
    """Closed forms for one class, each a function `(cell, input_t, state)`.

    `owner` is the registered class (`None` for a cell's own methods). A registered
    rule is hashable: the solves take it as a static argument, so that a new
    registration is a new compilation (see `registered_rule`)."""

    structure: Structure
    value_and_diagonal: Callable | None
    value_and_blocks: Callable | None
    value_and_jacobian: Callable | None
    value_and_gated: Callable | None = None
    owner: type | None = None


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
    """Give every instance of `cls` (and of its subclasses that keep its `__call__`)
    closed-form Jacobians.

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
    registration of the same class replaces the earlier one, and takes effect at
    the next call of `solve_parallel` or `solve_sharded` (which compile again for
    it; a function you jitted yourself around a solve keeps the closed form it was
    traced with until it is traced again).

    A registration belongs to `cls.__call__`: a subclass that defines its own
    `__call__` does not inherit it (its Jacobians come from its own methods or
    autodiff), one that does not override `__call__` does.
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
        structure, value_and_diagonal, value_and_blocks, value_and_jacobian, value_and_gated, cls
    )


def registered_rule(cell: Callable) -> JacobianRule | None:
    """The registration that applies to `cell`: the first class along its MRO that is
    registered and whose `__call__` is the cell's (a closed form is only the
    Jacobian of the `__call__` it was written for)."""
    call = getattr(type(cell), "__call__", None)
    for cls in type(cell).__mro__:
        rule = _REGISTRY.get(cls)
        if rule is not None and getattr(cls, "__call__", None) is call:
            return rule
    return None


def _unbound(cell, name: str) -> Callable | None:
    method = getattr(cell, name, None)
    return None if method is None else (lambda _, x, s: method(x, s))


def jacobian_rule(cell: Callable, registered: JacobianRule | None = None) -> JacobianRule:
    """The closed forms of `cell`: `registered` (by default its class's registration,
    `registered_rule(cell)`), else its own methods."""
    registered = registered_rule(cell) if registered is None else registered
    if registered is not None:
        return registered
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


_METHODS = {
    "value_and_diagonal": "value_and_diagonal_jacobian",
    "value_and_blocks": "value_and_block_jacobian",
    "value_and_jacobian": "value_and_jacobian",
    "value_and_gated": "value_and_gated_jacobian",
}


def _name(rule: JacobianRule, kind: str, cell: Callable) -> str:
    """Where the closed form `kind` of `rule` comes from, for error messages."""
    if rule.owner is not None:
        f = getattr(rule, kind)
        fname = getattr(f, "__qualname__", None) or repr(f)
        return f"`{fname}` (registered as `register_jacobian({rule.owner.__name__}, {kind}=...)`)"
    if kind == "value_and_diagonal" and getattr(cell, _METHODS[kind], None) is None:
        return "`cell.diagonal_jacobian`"
    return f"`cell.{_METHODS[kind]}`"


def flat_cell(
    cell: Callable,
    x_t: PyTree,
    init_state: PyTree,
    spec: StateSpec,
    registered: JacobianRule | None = None,
) -> FlatCell:
    """`cell` on flat `(D,)` states, with whatever closed-form Jacobians it has.

    `registered` is `registered_rule(cell)`, looked up by the caller outside its
    `jit` so that the compiled solve depends on it."""
    # Closure conversion turns whatever the cell closes over (parameters, tracers
    # of an outer jax.grad) into pytree leaves, so the custom JVP can return
    # their cotangents; plain closures would otherwise fail under differentiation.
    convert = lambda f: closure_convert(f, x_t, init_state)  # noqa: E731
    rule = jacobian_rule(cell, registered)
    bound = {}
    for kind in _METHODS:
        f = getattr(rule, kind)
        if f is not None:
            f = functools.partial(f, cell)
            check_closed_form(f, _name(rule, kind, cell), kind, x_t, init_state, spec)
        bound[kind] = f
    both, blocks = bound["value_and_diagonal"], bound["value_and_blocks"]
    if both is None and blocks is not None:
        # The diagonal of the blocks serves the quasi solvers.
        def both(x, s, blocks=blocks):
            value, b = blocks(x, s)
            return value, spec.unravel(blocks_to_diagonal(b).astype(spec.dtype))

    diag = None
    if both is not None:
        value_and_diag = both  # closed over (not a default argument: those are not converted)
        diag, both = convert(lambda x, s: value_and_diag(x, s)[1]), convert(value_and_diag)
    dense, gated = bound["value_and_jacobian"], bound["value_and_gated"]
    return FlatCell(
        convert(cell),
        diag,
        spec,
        both,
        None if dense is None else convert(dense),
        blocks=None if blocks is None else convert(blocks),
        gated=None if gated is None else convert(gated),
        structure=rule.structure,
        forward_mode=_has_forward_mode(cell, x_t, init_state),
    )


def _has_forward_mode(cell: Callable, x_t: PyTree, init_state: PyTree) -> bool:
    """Whether JAX can push a tangent through `cell`: not if it calls a `jax.custom_vjp`
    function ("can't apply forward-mode autodiff (jvp) to a custom_vjp function").

    Tracing such a JVP does not raise (evaluating it does): it leaves a `custom_lin`,
    a linear map that can only be transposed, in the JVP's jaxpr."""

    def push(x, s):
        return jax.jvp(lambda s_: cell(x, s_), (s,), (s,))

    return not _contains(eqx.filter_make_jaxpr(push)(x_t, init_state)[0].jaxpr, "custom_lin")


def _contains(jaxpr: jex.Jaxpr, primitive: str) -> bool:
    """Whether `primitive` occurs in `jaxpr` or in a jaxpr nested in it (calls, loops)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == primitive:
            return True
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = sub.jaxpr if isinstance(sub, jex.ClosedJaxpr) else sub
                if isinstance(sub, jex.Jaxpr) and _contains(sub, primitive):
                    return True
    return False
