"""A cell that holds its state on padding steps, keeping the inner cell's closed forms.

`masked(cell)` is the cell `((x_t, valid_t), s) -> cell(x_t, s) if valid_t else s`.
On a padding step (`valid_t` False) its Jacobian is the identity and its
derivative with respect to `x_t` and the parameters is exactly zero, so a padded
suffix converges as soon as the last valid step has, and nothing in the padding
reaches the states, the loss or the gradient.

The inner cell's closed-form Jacobians (its own methods or a `register_jacobian`
registration) carry over: on a padding step the diagonal becomes ones, the blocks
and the dense Jacobian identities, and a `GatedJacobian` loses its weight terms
and keeps identity blocks. They are given to the solves through the registry, on
one private subclass per combination of the closed forms the inner cell has.
"""

import functools
from collections.abc import Callable

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import PyTree

from .._gated import GatedJacobian
from .._structure import JacobianRule, jacobian_rule, register_jacobian


def _hold(valid, new: PyTree, old: PyTree) -> PyTree:
    return jtu.tree_map(lambda a, b: jnp.where(valid, a, b), new, old)


class _Masked(eqx.Module):
    """`cell` on `(input_t, valid_t)` inputs: the new state where `valid_t`, else the old."""

    cell: Callable

    def __call__(self, input_t, state):
        x, valid = input_t
        return _hold(valid, self.cell(x, state), state)


def _value_and_diagonal(m: _Masked, input_t, state):
    x, valid = input_t
    value, diag = jacobian_rule(m.cell).value_and_diagonal(m.cell, x, state)  # pyright: ignore[reportOptionalCall]
    ones = jtu.tree_map(jnp.ones_like, diag)
    return _hold(valid, value, state), _hold(valid, diag, ones)


def _value_and_blocks(m: _Masked, input_t, state):
    x, valid = input_t
    value, blocks = jacobian_rule(m.cell).value_and_blocks(m.cell, x, state)  # pyright: ignore[reportOptionalCall]
    eye = jnp.broadcast_to(jnp.eye(blocks.shape[-1], dtype=blocks.dtype), blocks.shape)
    return _hold(valid, value, state), jnp.where(valid, blocks, eye)


def _value_and_jacobian(m: _Masked, input_t, state):
    x, valid = input_t
    value, jac = jacobian_rule(m.cell).value_and_jacobian(m.cell, x, state)  # pyright: ignore[reportOptionalCall]
    eye = jnp.eye(jac.shape[-1], dtype=jac.dtype)
    return _hold(valid, value, state), jnp.where(valid, jac, eye)


def _value_and_gated(m: _Masked, input_t, state):
    x, valid = input_t
    value, g = jacobian_rule(m.cell).value_and_gated(m.cell, x, state)  # pyright: ignore[reportOptionalCall]
    eye = jnp.broadcast_to(jnp.eye(g.blocks.shape[-1], dtype=g.blocks.dtype), g.blocks.shape)
    coeffs = jnp.where(valid, g.coeffs, jnp.zeros_like(g.coeffs))
    masked = GatedJacobian(g.weight, coeffs, jnp.where(valid, g.blocks, eye))
    return _hold(valid, value, state), masked


_KINDS = {
    "value_and_diagonal": _value_and_diagonal,
    "value_and_blocks": _value_and_blocks,
    "value_and_jacobian": _value_and_jacobian,
    "value_and_gated": _value_and_gated,
}


@functools.cache
def _masked_class(structure: str, kinds: tuple[str, ...]) -> type[_Masked]:
    """The subclass of `_Masked` registered with the masked forms of `kinds`."""
    if not kinds:
        return _Masked
    cls = type(f"_Masked_{structure}_{'_'.join(kinds)}", (_Masked,), {})
    register_jacobian(cls, structure=structure, **{k: _KINDS[k] for k in kinds})  # pyright: ignore[reportArgumentType]
    return cls


def masked(cell: Callable) -> _Masked:
    """`cell` holding its state where the second input is False (module docstring)."""
    rule: JacobianRule = jacobian_rule(cell)
    kinds = tuple(k for k in _KINDS if getattr(rule, k) is not None)
    return _masked_class(rule.structure, kinds)(cell)
