"""A cell that holds its state on padding steps, keeping the inner cell's closed forms.

`masked(cell)` is the cell `((x_t, valid_t), s) -> cell(x_t, s) if valid_t else s`.
On a padding step (`valid_t` False) its Jacobian is the identity and its
derivative with respect to `x_t` and the parameters is exactly zero, so a padded
suffix converges as soon as the last valid step has, and nothing in the padding
reaches the states, the loss or the gradient.

The inner cell's closed-form Jacobians (its own methods or a `register_jacobian`
registration) carry over: on a padding step the diagonal becomes ones, the blocks
and the dense Jacobian identities, and a `GatedJacobian` loses its weight terms
and keeps identity blocks. They reach the solves as the wrapper's own methods
(`value_and_jacobian`, ...), present exactly where the inner cell has the closed
form, so the wrapper touches no global state. The inner cell's registration, read
when the wrapper is made, is a static field: a new registration changes the
wrapper's tree structure, so the solves compile again for it, as they do for the
unwrapped cell.
"""

from collections.abc import Callable

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import PyTree

from .._gated import GatedJacobian
from .._structure import JacobianRule, jacobian_rule, registered_rule


def _hold(valid, new: PyTree, old: PyTree) -> PyTree:
    return jtu.tree_map(lambda a, b: jnp.where(valid, a, b), new, old)


def _diagonal(valid, value, state, diag):
    ones = jtu.tree_map(jnp.ones_like, diag)
    return _hold(valid, value, state), _hold(valid, diag, ones)


def _blocks(valid, value, state, blocks):
    eye = jnp.broadcast_to(jnp.eye(blocks.shape[-1], dtype=blocks.dtype), blocks.shape)
    return _hold(valid, value, state), jnp.where(valid, blocks, eye)


def _dense(valid, value, state, jac):
    eye = jnp.eye(jac.shape[-1], dtype=jac.dtype)
    return _hold(valid, value, state), jnp.where(valid, jac, eye)


def _gated(valid, value, state, g: GatedJacobian):
    eye = jnp.broadcast_to(jnp.eye(g.blocks.shape[-1], dtype=g.blocks.dtype), g.blocks.shape)
    coeffs = jnp.where(valid, g.coeffs, jnp.zeros_like(g.coeffs))
    masked = GatedJacobian(g.weight, coeffs, jnp.where(valid, g.blocks, eye))
    return _hold(valid, value, state), masked


class _Masked(eqx.Module):
    """`cell` on `(input_t, valid_t)` inputs: the new state where `valid_t`, else the old.

    `registered` is `registered_rule(cell)` when the wrapper was made (static, so
    that it is part of the compiled solve's key)."""

    cell: Callable
    registered: JacobianRule | None = eqx.field(static=True)

    def __call__(self, input_t, state):
        x, valid = input_t
        return _hold(valid, self.cell(x, state), state)

    @property
    def jacobian_structure(self) -> str:
        return self._rule().structure

    def _rule(self) -> JacobianRule:
        return jacobian_rule(self.cell, self.registered)

    def _method(self, kind: str, mask: Callable) -> Callable | None:
        """The masked closed form `kind` of the inner cell, or None if it has none."""
        f = getattr(self._rule(), kind)
        if f is None:
            return None

        def masked_form(input_t, state):
            x, valid = input_t
            value, jac = f(self.cell, x, state)
            return mask(valid, value, state, jac)

        return masked_form

    # Read by `jacobian_rule` as the cell's own methods (None: no such closed form).
    @property
    def value_and_diagonal_jacobian(self) -> Callable | None:
        return self._method("value_and_diagonal", _diagonal)

    @property
    def value_and_block_jacobian(self) -> Callable | None:
        return self._method("value_and_blocks", _blocks)

    @property
    def value_and_jacobian(self) -> Callable | None:
        return self._method("value_and_jacobian", _dense)

    @property
    def value_and_gated_jacobian(self) -> Callable | None:
        return self._method("value_and_gated", _gated)


def masked(cell: Callable) -> _Masked:
    """`cell` holding its state where the second input is False (module docstring)."""
    return _Masked(cell, registered_rule(cell))
