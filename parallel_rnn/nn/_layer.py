"""`RNN`: one recurrent layer evaluated by a parallel solve, and its `LayerResult`."""

from collections.abc import Callable
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PyTree

from .._sequential import solve_sequential
from .._solve import solve_parallel
from .._solver.base import AbstractSolver
from .._solver.deer import DEER
from ._mask import masked


OnFailure = Literal["fallback", "raise", "ignore"]
_POLICIES = ("fallback", "raise", "ignore")


class LayerResult(eqx.Module):
    """What a layer's solve learned about itself, returned beside its outputs.

    Leading axes: `(B,)` for a batch, none for one sequence; a `Bidirectional`
    layer adds a trailing axis of 2 (forward, reverse) to the flags, and its
    `states` are the pair `(forward, reverse)`.

    **Attributes:**

    - `states`: the trajectory `s_1..s_T` in the inputs' time order (`(B, T, ...)`
      or `(T, ...)`, the state's pytree). Past a sequence's length it holds the
      state of the last valid step (the reverse direction: the state after the
      first step). Pass it back as `guess=` to warm-start the next solve.
    - `num_steps`: parallel iterations used.
    - `converged`: whether the parallel solve met its tolerance.
    - `fell_back`: whether the states were recomputed sequentially (only under
      `on_failure="fallback"`, exactly where `converged` is False).
    - `residual`: the parallel solve's final max-norm residual.
    """

    states: PyTree
    num_steps: Int[Array, "*B"]
    converged: Bool[Array, "*B"]
    fell_back: Bool[Array, "*B"]
    residual: Float[Array, "*B"]


def default_readout(state: PyTree) -> Array:
    """The output of a state: the state itself, or its first element for a tuple
    state (the `h` of an LSTM's `(h, c)`)."""
    if isinstance(state, (tuple, list)):
        return state[0]
    if not isinstance(state, jax.Array):
        raise TypeError(
            "the state is not an array nor a tuple: give the layer a `readout` "
            f"function from the state to the output; got {type(state)}"
        )
    return state


def zero_state(cell: Callable, x_t: Array) -> PyTree:
    """Zeros shaped like `cell`'s state: `(hidden_size,)` (or `state_size`), or a pair
    of them for a cell whose state is a pair (LSTM), in the dtype the cell returns."""
    n = getattr(cell, "state_size", None) or getattr(cell, "hidden_size", None)
    if not isinstance(n, int):
        raise TypeError(
            f"cannot tell the state shape of {type(cell).__name__} (it has no integer "
            "`hidden_size` or `state_size`): pass `init_state=`"
        )
    z = jax.ShapeDtypeStruct((n,), x_t.dtype)
    errors = []
    for candidate in (z, (z, z)):
        try:
            out = eqx.filter_eval_shape(cell, x_t, candidate)
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}")
            continue
        if jtu.tree_structure(out) == jtu.tree_structure(candidate):
            return jtu.tree_map(lambda o: jnp.zeros(o.shape, o.dtype), out)
    raise TypeError(
        f"cannot tell the state shape of {type(cell).__name__} from input_t of shape "
        f"{x_t.shape}: neither a ({n},) array nor a pair of them is accepted and "
        "returned by it (pass `init_state=` if the state is something else, or check "
        f"the inputs' last axis). Errors: {' | '.join(e[:300] for e in errors)}"
    )


def reverse_index(T: int, length) -> Int[Array, " T"]:
    """The permutation reversing the first `length` steps of `T` and fixing the
    padding after them (its own inverse)."""
    t = jnp.arange(T, dtype=jnp.asarray(length).dtype)
    return jnp.where(t < length, length - 1 - t, t)


class RNN(eqx.Module):
    """A recurrent layer: `s_t = cell(x_t, s_{t-1})` evaluated by a parallel solve,
    then `y_t = readout(s_t)`.

    **Arguments:**

    - `cell`: `cell(input_t, state) -> new_state`, e.g. `parallel_rnn.cells.GRU`.
    - `solver`: a `parallel_rnn` solver (default `DEER()`).
    - `readout`: `state -> output` for one step (default: the state, or `h` of a
      pair state `(h, c)`); may be a module with parameters (`eqx.nn.Linear`).
    - `reverse`: run from each sequence's last valid step back to its first.
    - `rtol`, `atol`, `max_steps`: as for [`parallel_rnn.solve_parallel`][].
    - `on_failure`: what to do where a solve does not converge (`max_steps`
      reached): `"fallback"` (default) recomputes those sequences with
      `solve_sequential` (exact, BPTT gradient) and flags them in
      `LayerResult.fell_back`; `"raise"` raises a runtime error (`throw=True`);
      `"ignore"` returns the last iterate, flagged by `converged=False`.

    **Calling:** `layer(inputs, *, lengths=None, init_state=None, guess=None)`
    with `inputs` `(T, M)` or a batch `(B, T, M)`, `T >= 1` (integer or boolean
    inputs are cast to the floating dtype of the cell's parameters); `lengths`
    (`(B,)` integers, or a scalar for one sequence, each in `[0, T]`: a
    `ValueError` when concrete, a runtime error under `jit`/`vmap`) marks padding
    at the end: past its length a sequence holds its last valid state and its
    outputs are zero, and the padding inputs get exactly zero gradient (length 0:
    every state is `init_state`). `init_state` is `s_0` (with a leading `B` for a
    batch; default zeros of the cell's `hidden_size`, or a pair of them for an
    LSTM-like cell); `guess` is a previous `LayerResult.states` for the same
    sequences, `(B, T, ...)` or `(T, ...)` (a warm start: fewer iterations, same
    answer, no gradient).
    Returns `(outputs, LayerResult)`, outputs `(…, T, out)`.

    A batch is solved as one `vmap`ped solve: it iterates until its slowest member
    has converged, and so does its gradient.
    """

    cell: Callable
    solver: AbstractSolver
    readout: Callable
    reverse: bool = eqx.field(static=True)
    rtol: float | None = eqx.field(static=True)
    atol: float | None = eqx.field(static=True)
    max_steps: int | None = eqx.field(static=True)
    on_failure: OnFailure = eqx.field(static=True)

    def __init__(
        self,
        cell: Callable,
        solver: AbstractSolver = DEER(),
        *,
        readout: Callable = default_readout,
        reverse: bool = False,
        rtol: float | None = None,
        atol: float | None = None,
        max_steps: int | None = None,
        on_failure: OnFailure = "fallback",
    ):
        if not isinstance(solver, AbstractSolver):
            raise TypeError(f"`solver` must be a parallel_rnn solver (e.g. DEER()); got {solver!r}")
        if on_failure not in _POLICIES:
            raise ValueError(f"`on_failure` must be one of {_POLICIES}; got {on_failure!r}")
        self.cell = cell
        self.solver = solver
        self.readout = readout
        self.reverse = bool(reverse)
        self.rtol = rtol
        self.atol = atol
        self.max_steps = max_steps
        self.on_failure = on_failure

    def __call__(
        self,
        inputs: Float[Array, "*B T M"],
        *,
        lengths: Int[Array, "*B"] | int | None = None,
        init_state: PyTree | None = None,
        guess: PyTree | None = None,
    ) -> tuple[Array, LayerResult]:
        inputs = jnp.asarray(inputs)
        if inputs.ndim not in (2, 3):
            raise ValueError(
                f"`inputs` must be (T, M) or a batch (B, T, M); got shape {inputs.shape}"
            )
        if inputs.shape[-2] == 0:
            raise ValueError(f"`inputs` must have at least one step; got shape {inputs.shape}")
        if not jnp.issubdtype(inputs.dtype, jnp.inexact):
            inputs = inputs.astype(_float_dtype(self.cell))
        batched = inputs.ndim == 3
        T = inputs.shape[-2]
        if lengths is not None:
            lengths = check_lengths(lengths, inputs.shape)
        x_t = inputs[(0,) * (inputs.ndim - 1)]
        if init_state is None:
            s0 = zero_state(self.cell, x_t)
            if batched:
                s0 = jtu.tree_map(lambda a: jnp.broadcast_to(a, (inputs.shape[0], *a.shape)), s0)
        else:
            s0 = init_state
            _check_init_state(self.cell, x_t, s0, inputs.shape)
        if guess is not None:
            _check_guess(guess, inputs.shape)
        axes = 0 if batched else None
        solve = jax.vmap(self._solve, in_axes=(0, axes, 0, 0)) if batched else self._solve
        states, (num_steps, converged, residual), xs = solve(inputs, lengths, s0, guess)
        fell_back = jnp.zeros_like(converged)
        if self.on_failure == "fallback":
            cell = self.cell if lengths is None else masked(self.cell)
            states = _fallback(cell, xs, s0, states, converged, batched)
            fell_back = ~converged
        # Back to the inputs' time order.
        order = jax.vmap(self._order, in_axes=(0, axes)) if batched else self._order
        states = order(states, lengths)
        outputs = self._outputs(states, lengths, T, batched)
        return outputs, LayerResult(states, num_steps, converged, fell_back, residual)

    def _order(self, tree: PyTree, length) -> PyTree:
        """Between the inputs' time order and the solve's, for one sequence (an
        involution): the identity forward; reversed, a flip, or with `length` the
        reversal of the first `length` steps (the padding stays at the end)."""
        if not self.reverse:
            return tree
        if length is None:
            return jtu.tree_map(lambda a: jnp.flip(a, 0), tree)
        T = jtu.tree_leaves(tree)[0].shape[0]
        index = reverse_index(T, length)
        return jtu.tree_map(lambda a: a[index], tree)

    def _solve(self, x, length, s0, guess):
        """One sequence: the solve in its own time order, masked past `length`."""
        x = self._order(x, length)
        if length is None:
            cell, xs = self.cell, x
        else:
            cell, xs = masked(self.cell), (x, jnp.arange(x.shape[0], dtype=length.dtype) < length)
        sol = solve_parallel(
            cell,
            xs,
            s0,
            self.solver,
            guess=None if guess is None else self._order(guess, length),
            rtol=self.rtol,
            atol=self.atol,
            max_steps=self.max_steps,
            throw=self.on_failure == "raise",
        )
        return sol.states, (sol.num_steps, sol.converged, sol.residual), xs

    def _outputs(self, states, lengths, T, batched):
        readout = jax.vmap(self.readout)
        if batched:
            readout = jax.vmap(readout)
        outputs = readout(states)
        if lengths is not None:
            outputs = zero_padding(outputs, lengths)
        return outputs


def _fallback(cell, xs, s0, states, converged, batched):
    """Replace the unconverged sequences' states by `solve_sequential`'s. On a batch
    the branch is taken once for the whole batch (a `lax.cond` on "all converged"),
    so a batch that converged pays nothing more; a `vmap` around an unbatched layer
    turns the `cond` into a select, which runs the sequential scan on every call."""
    sequential = jax.vmap(solve_sequential, in_axes=(None, 0, 0)) if batched else solve_sequential

    def exact(states):
        exact_states = sequential(cell, xs, s0)
        keep = lambda e, s: jnp.where(_expand(converged, s), s, e)  # noqa: E731
        return jtu.tree_map(keep, exact_states, states)

    return jax.lax.cond(jnp.all(converged), lambda s: s, exact, states)


def zero_padding(y: Array, lengths: Int[Array, "*B"]) -> Array:
    """`y` with the steps at and past each sequence's length set to zero (`y` has
    the time axis right after the batch axes of `lengths`, then any others)."""
    T = y.shape[lengths.ndim]
    t = jnp.arange(T, dtype=lengths.dtype)
    valid = t[None, :] < lengths[:, None] if lengths.ndim else t < lengths
    valid = valid.reshape(valid.shape + (1,) * (y.ndim - valid.ndim))
    return jnp.where(valid, y, jnp.zeros_like(y))


def check_lengths(lengths, shape: tuple[int, ...]) -> Int[Array, "*B"]:
    """`lengths` as `int32`, after checking it against inputs of shape `(T, M)` or
    `(B, T, M)`: integers, `()` or `(B,)`, each in `[0, T]` (a `ValueError` when
    concrete, else a runtime error from `eqx.error_if`)."""
    T = shape[-2]
    want = shape[:1] if len(shape) == 3 else ()
    dtype = np.result_type(lengths) if not hasattr(lengths, "dtype") else lengths.dtype
    if np.shape(lengths) != want or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(
            f"`lengths` must be integers of shape {want} for inputs of shape {shape}; "
            f"got {dtype}{np.shape(lengths)}"
        )
    message = f"`lengths` must lie in [0, T] = [0, {T}] for inputs of shape {shape}"
    try:
        values = np.asarray(lengths)
    except jax.errors.TracerArrayConversionError:  # traced: checked at run time below
        values = None
    if values is not None:
        if np.any(values < 0) or np.any(values > T):
            raise ValueError(f"{message}; got {values}")
        return jnp.asarray(values, jnp.int32)
    # Compared in their own dtype (a cast first could wrap), then cast: the step
    # indices `arange(T)` are made in the lengths' dtype, which for int8 cannot
    # hold T > 127.
    bad = lengths < 0
    if T < jnp.iinfo(dtype).max:
        bad = bad | (lengths > T)
    return eqx.error_if(lengths, bad, message).astype(jnp.int32)


def _float_dtype(cell) -> jnp.dtype:
    """The floating dtype of `cell`'s parameters (the first found), or JAX's default."""
    leaves = [a for a in jtu.tree_leaves(cell) if eqx.is_inexact_array(a)]
    return leaves[0].dtype if leaves else jnp.zeros(()).dtype


def _shapes(tree: PyTree) -> list[tuple[int, ...]]:
    return [tuple(np.shape(a)) for a in jtu.tree_leaves(tree)]


def _check_init_state(cell, x_t, s0: PyTree, shape: tuple[int, ...]) -> None:
    """`s0` must be one state, with a leading batch axis `B` for batched inputs; where
    the cell's state shape is known (`zero_state`), its shapes must match it."""
    batch = shape[:1] if len(shape) == 3 else ()
    try:
        expected = [batch + s for s in _shapes(zero_state(cell, x_t))]
    except TypeError:  # a state `zero_state` cannot guess: the solve checks it
        expected = None
    got = _shapes(s0)
    ok = all(s[: len(batch)] == batch for s in got) if expected is None else got == expected
    if not ok:
        want = "leading axis " + str(batch) if expected is None else str(expected)
        raise ValueError(
            f"`init_state` must be one state per sequence ({want}) for inputs of shape "
            f"{shape}; got leaves of shapes {got}"
        )


def _check_guess(guess: PyTree, shape: tuple[int, ...]) -> None:
    """A guess is a trajectory: leaves `(B, T, ...)` for batched inputs, else `(T, ...)`."""
    lead = shape[:-1]
    got = _shapes(guess)
    if not all(s[: len(lead)] == lead for s in got):
        raise ValueError(
            f"`guess` must be a trajectory of states with leading axes {lead} (a previous "
            f"`LayerResult.states`) for inputs of shape {shape}; got leaves of shapes {got}"
        )


def _expand(flag, like):
    """`flag` `(B,)` or `()` broadcastable against `like` `(B, T, ...)` or `(T, ...)`."""
    return flag.reshape(flag.shape + (1,) * (like.ndim - flag.ndim))
