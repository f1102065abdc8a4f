"""The recurrence as the solvers see it: a cell on flat `(D,)` states.

Every solver works on a trajectory stored as one `(T, D)` array. `StateSpec` maps
the user's state pytree to that flat vector and back, and `Problem` bundles the
flat cell with the inputs and the initial state, offering the batched evaluations
(the cell over all `T` steps, with its dense Jacobian or its diagonal) that each
solver iteration needs.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PyTree

from ._gated import GatedJacobian, vmap_gated
from ._jaxpr_diagonal import structured_value_and_diagonal
from ._shard import shift_right


class StateSpec(eqx.Module):
    """Static description of a state pytree: its structure, leaf shapes and dtype."""

    treedef: Any = eqx.field(static=True)
    shapes: tuple[tuple[int, ...], ...] = eqx.field(static=True)
    dtype: Any = eqx.field(static=True)

    @property
    def size(self) -> int:
        return int(sum(int(np.prod(s)) for s in self.shapes))

    def ravel(self, tree: PyTree) -> Float[Array, " D"]:
        """State pytree -> `(D,)` vector."""
        leaves = jax.tree_util.tree_leaves(tree)
        return jnp.concatenate([jnp.ravel(leaf) for leaf in leaves]).astype(self.dtype)

    def unravel(self, flat: Float[Array, " D"]) -> PyTree:
        """`(D,)` vector -> state pytree."""
        leaves, start = [], 0
        for shape in self.shapes:
            n = int(np.prod(shape))
            leaves.append(flat[start : start + n].reshape(shape))
            start += n
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def ravel_trajectory(self, tree: PyTree) -> Float[Array, "T D"]:
        """Trajectory pytree (leaves with leading `T`) -> `(T, D)`."""
        leaves = jax.tree_util.tree_leaves(tree)
        T = leaves[0].shape[0]
        return jnp.concatenate([leaf.reshape(T, -1) for leaf in leaves], axis=1).astype(self.dtype)

    def unravel_trajectory(self, flat: Float[Array, "T D"]) -> PyTree:
        """`(T, D)` -> trajectory pytree with leading `T` on every leaf."""
        return jax.vmap(self.unravel)(flat)


def make_spec(tree: PyTree) -> StateSpec:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    dtype = jnp.result_type(*leaves)
    return StateSpec(treedef, tuple(tuple(jnp.shape(leaf)) for leaf in leaves), dtype)


class FlatCell(eqx.Module):
    """`cell(x_t, state_pytree)` seen as `(x_t, (D,)) -> (D,)`.

    `diag` is the cell's analytic `diagonal_jacobian` in the same flat form, or
    `None` when the cell has none (autodiff is used then). `value_and_diag` is the
    cell's optional `value_and_diagonal_jacobian`, which shares the gates between
    the step and its diagonal (one pass instead of two). `value_and_jac` is the
    cell's optional `value_and_jacobian`, returning the new state and the `(D, D)`
    Jacobian of the flat new state with respect to the flat state. `blocks` returns
    the new state and the `(n, k, k)` diagonal blocks of that Jacobian, and
    `structure` says whether the diagonal or the blocks are the exact Jacobian
    (`"diagonal"`, `"block"`) or approximations of a `"dense"` one (`_structure.py`).
    `gated` returns the new state and the dense Jacobian as a one-step
    `GatedJacobian` (`_gated.py`). `forward_mode` is False for a cell that JAX
    cannot differentiate in forward mode (one holding a `jax.custom_vjp` function):
    its Jacobians are then read off VJPs (`jax.jacrev`, one VJP per row).
    """

    cell: Callable
    diag: Callable | None
    spec: StateSpec
    value_and_diag: Callable | None = None
    value_and_jac: Callable | None = None
    blocks: Callable | None = None
    gated: Callable | None = None
    structure: str = eqx.field(static=True, default="dense")
    forward_mode: bool = eqx.field(static=True, default=True)

    def __call__(self, x_t: PyTree, s: Float[Array, " D"]) -> Float[Array, " D"]:
        return self.spec.ravel(self.cell(x_t, self.spec.unravel(s)))

    def diagonal(self, x_t: PyTree, s: Float[Array, " D"]) -> Float[Array, " D"]:
        if self.diag is None:
            raise ValueError("this cell has no analytic diagonal_jacobian")
        return self.spec.ravel(self.diag(x_t, self.spec.unravel(s)))


class Problem(eqx.Module):
    """One recurrence to solve: flat cell, inputs (leading axis `T`), `s_0`.

    All batched methods take the whole trajectory `states = (s_1..s_T)` and
    evaluate the cell at the shifted trajectory `(s_0..s_{T-1})`.
    """

    fn: FlatCell
    inputs: PyTree
    init: Float[Array, " D"]

    @property
    def length(self) -> int:
        return jax.tree_util.tree_leaves(self.inputs)[0].shape[0]

    def shift(self, states: Float[Array, "T D"]) -> Float[Array, "T D"]:
        """`(s_1..s_T) -> (s_0..s_{T-1})`."""
        return shift_right(states, self.init)  # across shards when sequence-sharded

    def evaluate(self, states: Float[Array, "T D"]) -> Float[Array, "T D"]:
        """`f(x_t, s_{t-1})` for every `t`: one batched cell evaluation."""
        return batched(self.fn, self.inputs, self.shift(states))

    def linearise_dense(
        self, states: Float[Array, "T D"]
    ) -> tuple[Float[Array, "T D"], Float[Array, "T D D"]]:
        """`f(x_t, s_{t-1})` and `A_t = ∂f/∂s(x_t, s_{t-1})`, sharing one primal pass."""
        if self.fn.value_and_jac is None and self.fn.gated is not None:
            fs, gated = self.linearise_gated(states)
            return fs, gated.dense()
        value_and_jac = self.fn.value_and_jac
        if value_and_jac is not None:
            spec = self.fn.spec

            def analytic(x, s):
                value, jac = value_and_jac(x, spec.unravel(s))
                return spec.ravel(value), jac.astype(spec.dtype)

            # A closed form writes each A_t once from the gates; jacfwd pushes D
            # tangents through every intermediate, several T×D×D arrays in all.
            return jax.vmap(analytic)(self.inputs, self.shift(states))

        jacobian = jax.jacfwd if self.fn.forward_mode else jax.jacrev

        def one(x, s):
            # jacfwd with has_aux returns the primal computed inside the JVPs, so
            # the cell is evaluated once, not once more for the value.
            def both(s_):
                out = self.fn(x, s_)
                return out, out

            jac, value = jacobian(both, has_aux=True)(s)
            return value, jac

        return jax.vmap(one)(self.inputs, self.shift(states))

    def linearise_gated(
        self, states: Float[Array, "T D"]
    ) -> tuple[Float[Array, "T D"], GatedJacobian]:
        """`f` and `A_t` in the factored form of a gated cell: `O(T·D·K)` memory."""
        gated, spec = self.fn.gated, self.fn.spec
        if gated is None:
            raise ValueError("this cell has no closed-form gated Jacobian")

        def one(x, s):
            value, jac = gated(x, spec.unravel(s))
            return spec.ravel(value), jac.astype(spec.dtype)

        return vmap_gated(one, self.inputs, self.shift(states))

    def linearise_diagonal(
        self, states: Float[Array, "T D"]
    ) -> tuple[Float[Array, "T D"], Float[Array, "T D"]]:
        """`f(x_t, s_{t-1})` and the diagonal of `∂f/∂s`, never materialising `T×D×D`."""
        prev = self.shift(states)
        value_and_diag = self.fn.value_and_diag
        if value_and_diag is not None:
            spec = self.fn.spec

            def both(x, s):
                value, diag = value_and_diag(x, spec.unravel(s))
                return spec.ravel(value), spec.ravel(diag)

            return batched(both, self.inputs, prev)
        structured = self._structured_diagonal()
        if structured is not None:
            return batched(structured, self.inputs, prev)
        fs = batched(self.fn, self.inputs, prev)
        return fs, self._plain_diagonal(prev)  # the jaxpr analysis has already failed

    def linearise_exact(
        self, states: Float[Array, "T D"]
    ) -> tuple[Float[Array, "T D"], Array | GatedJacobian]:
        """`f` and the exact Jacobian in the cell's declared structure: `(T, D)` for a
        diagonal cell, `(T, n, k, k)` for a block-diagonal one, a `GatedJacobian` for a
        cell with that closed form, else `(T, D, D)`."""
        if self.fn.structure == "diagonal":
            return self.linearise_diagonal(states)
        if self.fn.structure == "block":
            return self.linearise_blocks(states, None)
        if self.fn.gated is not None:
            return self.linearise_gated(states)
        return self.linearise_dense(states)

    def linearise_blocks(
        self, states: Float[Array, "T D"], k: int | None
    ) -> tuple[Float[Array, "T D"], Float[Array, "T n k k"]]:
        """`f` and the `k×k` diagonal blocks of `∂f/∂s` (layout of `_structure.py`).

        From the cell's closed-form blocks when their size is `k` (`None`: whatever it
        is), else from its closed-form dense Jacobian, else by `D` JVP passes.
        """
        from ._structure import dense_to_blocks

        spec, prev = self.fn.spec, self.shift(states)
        if self.fn.blocks is not None:
            value, blocks = jax.vmap(self.fn.blocks)(self.inputs, jax.vmap(spec.unravel)(prev))
            if k is None or blocks.shape[-1] == k:
                return jax.vmap(spec.ravel)(value), blocks.astype(spec.dtype)
        if k is None:
            raise ValueError("this cell has no closed-form Jacobian blocks")
        if self.fn.value_and_jac is not None or self.fn.gated is not None:
            fs, jac = self.linearise_dense(states)
            return fs, dense_to_blocks(jac, k)
        fs = jax.vmap(self.fn)(self.inputs, prev)
        return fs, autodiff_blocks(self.fn, self.inputs, prev, k, self.fn.forward_mode)

    def diagonal_at(self, prev: Float[Array, "T D"]) -> Float[Array, "T D"]:
        """Diagonal of `∂f/∂s` at the given predecessors `prev = (s_0..s_{T-1})`."""
        structured = self._structured_diagonal()  # None when the cell has its own
        if structured is not None:
            return jax.vmap(structured)(self.inputs, prev)[1]
        return self._plain_diagonal(prev)

    def _plain_diagonal(self, prev: Float[Array, "T D"]) -> Float[Array, "T D"]:
        """The cell's analytic diagonal, else `D` JVP passes (no jaxpr analysis)."""
        if self.fn.diag is not None:
            return jax.vmap(self.fn.diagonal)(self.inputs, prev)
        return autodiff_diagonal(self.fn, self.inputs, prev, self.fn.forward_mode)

    def _structured_diagonal(self) -> Callable | None:
        """`(x_t, s) ↦ (f, diag ∂f/∂s)` read off the cell's jaxpr (`_jaxpr_diagonal.py`),
        or `None` when the cell has an analytic diagonal or is not representable."""
        if self.fn.diag is not None:
            return None
        step = jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), self.inputs
        )
        return structured_value_and_diagonal(self.fn, step, self.init)


# Batched evaluations on CPU run in chunks of about this many state entries:
# `lax.map` over `vmap`ped chunks of time steps. The gates, projections and other
# `T × k·D` temporaries of a cell then live one chunk at a time, and the chunks
# fit in cache. Measured (GRU, D = 16, T = 1e5, float32, 2-core CPU): QuasiDEER's
# compiled peak 97.6 MB to 52.8 MB without the polish, and its solve no slower
# (CPU time 350-370 ms against 400-420 ms). The gated linearisation stays one `vmap`:
# chunked, DEER's iteration took 15-25% longer. 0 disables chunking.
CHUNK_ELEMENTS = 2**18


def _chunk_length(T: int, D: int) -> int | None:
    """Time steps per chunk (a divisor of `T`, so that chunks stack without
    copies), or `None` for one `vmap` (not on CPU, short `T`, or no divisor near
    the target: a prime `T`)."""
    rows = max(1, CHUNK_ELEMENTS // max(D, 1))
    if not CHUNK_ELEMENTS or T <= rows or jax.default_backend() != "cpu":
        return None
    for b in range(rows, rows // 2, -1):
        if T % b == 0:
            return b
    return None


def batched(f: Callable, inputs: PyTree, prev: Float[Array, "T D"]) -> PyTree:
    """`jax.vmap(f)(inputs, prev)`, in chunks of time steps on CPU (`CHUNK_ELEMENTS`)."""
    T = prev.shape[0]
    b = _chunk_length(T, prev.shape[1])
    if b is None:
        return jax.vmap(f)(inputs, prev)

    def split(a):
        return a.reshape(T // b, b, *a.shape[1:])

    out = jax.lax.map(lambda a: jax.vmap(f)(*a), jax.tree_util.tree_map(split, (inputs, prev)))
    return jax.tree_util.tree_map(lambda a: a.reshape(T, *a.shape[2:]), out)


def _basis_products(
    fn: Callable, inputs: PyTree, prev: Float[Array, "T D"], i: Array, forward_mode: bool
) -> Float[Array, "T D"]:
    """Column `i` of `∂f/∂s` at every step by one JVP (`J e_i`), or without forward
    mode row `i` by one VJP (`e_iᵀ J`)."""
    e = jnp.zeros((prev.shape[1],), prev.dtype).at[i].set(1)
    if forward_mode:
        one = lambda x, s: jax.jvp(lambda s_: fn(x, s_), (s,), (e,))[1]  # noqa: E731
    else:
        one = lambda x, s: jax.vjp(lambda s_: fn(x, s_), s)[1](e)[0]  # noqa: E731
    return jax.vmap(one)(inputs, prev)


def autodiff_diagonal(
    fn: Callable, inputs: PyTree, prev: Float[Array, "T D"], forward_mode: bool = True
) -> Float[Array, "T D"]:
    """Jacobian diagonal by one JVP (or VJP, without forward mode) per state dimension.

    Each pass pushes the basis vector `e_i` through the cell at every time step
    and keeps component `i`, so memory stays `O(T·D)`; the price is `D` passes,
    which is why cells should define `diagonal_jacobian`.
    """
    T, D = prev.shape

    def column(i):
        return _basis_products(fn, inputs, prev, i, forward_mode)[:, i]

    return jax.lax.map(column, jnp.arange(D), batch_size=_columns_per_pass(D)).T


def _columns_per_pass(D: int) -> int | None:
    # Pushing a few basis tangents per pass (vectorised) rather than one: measured
    # on a 2-core CPU at T = 1e4, 2-4x faster on GRU/LSTM for D = 16..32 and ~1.5x
    # at D = 64, for `O(T·D·4)` memory; at D = 256 it was slower.
    return 4 if 4 <= D <= 128 else None


def autodiff_blocks(
    fn: Callable, inputs: PyTree, prev: Float[Array, "T D"], k: int, forward_mode: bool = True
) -> Float[Array, "T n k k"]:
    """The `k×k` diagonal blocks of `∂f/∂s` by one JVP (or VJP) per state dimension (`O(T·D·k)`)."""
    T, D = prev.shape
    n = D // k

    def column(i):
        # Column (row) i = b·n + j touches block j in its rows (columns) a·n + j.
        return _basis_products(fn, inputs, prev, i, forward_mode).reshape(T, k, n)[:, :, i % n]

    cols = jax.lax.map(column, jnp.arange(D), batch_size=_columns_per_pass(D))  # (D, T, k)
    cols = cols.reshape(k, n, T, k)  # JVPs: [b, j, t, a]; VJPs: [a, j, t, b]
    return jnp.transpose(cols, (2, 1, 3, 0) if forward_mode else (2, 1, 0, 3))  # [t, j, a, b]
