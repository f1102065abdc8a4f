"""Closure conversion: what a cell closes over, as pytree leaves.

A cell may be a closure over arrays (its weights), some of them tracers of an
outer transformation (`jax.grad` of a loss in the weights). The custom JVP of
the solve (`_implicit.py`) and `shard_map` must see those arrays as arguments,
not as hidden constants: `closure_convert` traces the cell once into a jaxpr
whose constants become leaves of a `Closure` module.

Unlike `eqx.filter_closure_convert`, a `Closure` compares only the shapes and
dtypes of its arguments with those it was traced with, not their shardings: the
sequence-sharded solve calls it inside `shard_map`, where every argument carries
the manual mesh. It is traced on abstract arguments without a sharding, so the
jaxpr records no mesh either (`jnp.zeros_like` of a time-sharded input would
otherwise carry the outer mesh into `shard_map`'s body).
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PyTree


class Closure(eqx.Module):
    """`fn` as a jaxpr with its constants as leaves (see the module docstring)."""

    # A leaf, not a static field (as in Equinox): it is not an array, so the
    # `eqx.partition`s that split off the differentiable and sharded parts keep
    # it with the static parts.
    jaxpr: Any
    consts: list
    in_tree: Any = eqx.field(static=True)
    in_types: tuple = eqx.field(static=True)
    out_tree: Any = eqx.field(static=True)
    out_static: Any = eqx.field(static=True)

    def __call__(self, *args):
        leaves, tree = jax.tree_util.tree_flatten(args)
        types = tuple((tuple(jnp.shape(x)), jnp.result_type(x)) for x in leaves)
        if tree != self.in_tree or types != self.in_types:
            raise ValueError(
                "the cell was called with arguments unlike those it was traced with: "
                f"{tree} {types} instead of {self.in_tree} {self.in_types}"
            )
        out = jax.core.eval_jaxpr(self.jaxpr, self.consts, *leaves)  # pyright: ignore[reportAttributeAccessIssue]
        return eqx.combine(jax.tree_util.tree_unflatten(self.out_tree, out), self.out_static)


def closure_convert(fn: Callable, *example_args: PyTree) -> Callable[..., Any]:
    """`fn` traced at the shapes and dtypes of `example_args` (only those are used), as a
    `Closure`."""
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), example_args
    )
    closed, out_struct, out_static = eqx.filter_make_jaxpr(fn)(*abstract)
    in_leaves, in_tree = jax.tree_util.tree_flatten(abstract)
    in_types = tuple((tuple(x.shape), jnp.dtype(x.dtype)) for x in in_leaves)
    out_tree = jax.tree_util.tree_structure(out_struct)
    return Closure(closed.jaxpr, list(closed.consts), in_tree, in_types, out_tree, out_static)
