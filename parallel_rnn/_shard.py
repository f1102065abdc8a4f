"""Sequence sharding: the collectives behind a time axis split over a mesh axis.

Inside `jax.shard_map`, each device holds `L = T/P` consecutive time steps. The
solvers are unchanged: the few building blocks that look across time (the shift
by one step, the linear recurrences, the Kalman recursions, the frontier and the
residual, global time indices) ask `sequence_axis()` at trace time and, when it
names a mesh axis, do their local work plus collectives over that axis. Outside
`sharded_over(...)` every function here is exactly the unsharded computation.

A linear recurrence `x_t = A_t x_{t-1} + b_t` over shards is solved in three
stages: each shard solves its own piece with a zero incoming value and forms the
affine map from the value entering it to the value leaving it (`x ↦ M x + v`:
`M` the product of its `A_t`, `v` its local end value); the `P` maps are
`all_gather`ed and composed in order over the shards (a scan of length `P`),
which gives every shard its incoming value `c`; each shard then solves its piece
again with `c` folded into its first right-hand side (`b_1 + A_1 c`). So one
recurrence costs two local scans plus the product of the local `A_t`, and
communicates one `(D, D)` matrix and one `D`-vector per shard (a `D`-vector for
diagonal `A`, `n` blocks `k×k` for block-diagonal `A`).

The context is a trace-time setting (a `contextvars.ContextVar`), read while the
solve loop is traced inside `shard_map`; nothing here is jitted on its own, so no
compiled function can be reused across the two settings.
"""

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int, PyTree


_AXIS: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "parallel_rnn_sequence_axis", default=None
)
_BATCH: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "parallel_rnn_batch_axis", default=None
)
_HIGHEST = lax.Precision.HIGHEST


def sequence_axis() -> str | None:
    """The mesh axis the time axis is split over, or `None` (not sharded)."""
    return _AXIS.get()


@contextlib.contextmanager
def sharded_over(axis_name: str | None, batch_axis: str | None = None) -> Iterator[None]:
    """Trace the solve loop with its time axis split over `axis_name` (`None`: not split),
    for one sequence of a batch split over `batch_axis` (`None`: no batch axis)."""
    token, batch_token = _AXIS.set(axis_name), _BATCH.set(batch_axis)
    try:
        yield
    finally:
        _AXIS.reset(token)
        _BATCH.reset(batch_token)


def lockstep(cond: Callable, body: Callable) -> tuple[Callable, Callable]:
    """A `while_loop` whose trip count is the same on every device of the mesh.

    With a batch axis, each sequence's loop would stop after its own number of
    iterations, and the devices of different batch shards would then meet
    different collectives (a `ppermute` is one operation over the whole mesh):
    a deadlock. So the loop runs while any sequence anywhere is unfinished, and
    a finished sequence's carry is held fixed (its result and count unchanged).
    """
    axis = _BATCH.get()
    if axis is None:
        return cond, body

    def any_cond(carry):
        return lax.pmax(cond(carry).astype(jnp.int32), axis) > 0

    def held_body(carry):
        active = cond(carry)
        new = body(carry)
        return jax.tree_util.tree_map(lambda a, b: jnp.where(active, a, b), new, carry)

    return any_cond, held_body


def _shards(axis: str) -> int:
    return int(lax.axis_size(axis))


def _shard_index(axis: str) -> Int[Array, ""]:
    return lax.axis_index(axis).astype(jnp.int32)


def global_length(local_length: int) -> int:
    """`T` from the local number of time steps."""
    axis = sequence_axis()
    return local_length if axis is None else local_length * _shards(axis)


def time_index(local_length: int) -> Int[Array, " L"]:
    """Global time indices (0-based) of the local steps."""
    t = jnp.arange(local_length, dtype=jnp.int32)
    axis = sequence_axis()
    if axis is None:
        return t
    return t + _shard_index(axis) * jnp.int32(local_length)


def shift_right(x: Float[Array, "L ..."], first: Float[Array, "..."]) -> Float[Array, "L ..."]:
    """`(x_1..x_T) -> (first, x_1..x_{T-1})` over the whole, possibly sharded, time axis."""
    axis = sequence_axis()
    if axis is None:
        return jnp.concatenate([first[None], x[:-1]], axis=0)
    P = _shards(axis)
    # ppermute fills the receivers without a sender (shard 0) with zeros.
    from_prev = lax.ppermute(x[-1], axis, perm=[(i, i + 1) for i in range(P - 1)])
    head = jnp.where(_shard_index(axis) == 0, first, from_prev)
    return jnp.concatenate([head[None], x[:-1]], axis=0)


def shift_left(x: Float[Array, "L ..."], last: Float[Array, "..."]) -> Float[Array, "L ..."]:
    """`(x_1..x_T) -> (x_2..x_T, last)` over the whole, possibly sharded, time axis."""
    axis = sequence_axis()
    if axis is None:
        return jnp.concatenate([x[1:], last[None]], axis=0)
    P = _shards(axis)
    from_next = lax.ppermute(x[0], axis, perm=[(i + 1, i) for i in range(P - 1)])
    tail = jnp.where(_shard_index(axis) == P - 1, last, from_next)
    return jnp.concatenate([x[1:], tail[None]], axis=0)


def flip_time(x: Array) -> Array:
    """Reverse the time axis; sharded, every shard sends its flipped block to its mirror."""
    axis = sequence_axis()
    x = jnp.flip(x, axis=0)
    if axis is None:
        return x
    P = _shards(axis)
    return lax.ppermute(x, axis, perm=[(i, P - 1 - i) for i in range(P)])


def time_max(x: Array) -> Array:
    """Maximum over the whole time axis of a per-shard maximum."""
    axis = sequence_axis()
    return x if axis is None else lax.pmax(x, axis)


def time_min(x: Array) -> Array:
    """Minimum over the whole time axis of a per-shard minimum."""
    axis = sequence_axis()
    return x if axis is None else lax.pmin(x, axis)


def cumulative_max(x: Float[Array, " L"], reverse: bool = False) -> Float[Array, " L"]:
    """Running maximum along the whole (possibly sharded) time axis; `reverse`: from the end."""
    # An associative scan of `maximum`: 2-4x faster than `lax.cummax` on XLA:CPU
    # (37 against 70-150 us at T = 1e4), and max is exact, so the same result.
    local = lax.associative_scan(jnp.maximum, x, reverse=reverse, axis=0)
    axis = sequence_axis()
    if axis is None:
        return local
    # Each shard's own maximum, gathered: the running maximum entering a shard is
    # the largest of those before it (after it, in reverse).
    totals = lax.all_gather(local[0] if reverse else local[-1], axis)
    shard = jnp.arange(totals.shape[0], dtype=jnp.int32)
    i = _shard_index(axis)
    earlier = shard > i if reverse else shard < i
    return jnp.maximum(local, jnp.max(jnp.where(earlier, totals, -jnp.inf)))


def time_sum(x: Array) -> Array:
    """Sum over the whole time axis of a per-shard sum."""
    axis = sequence_axis()
    return x if axis is None else lax.psum(x, axis)


def at_time(x: Float[Array, "L ..."], index: Int[Array, ""]) -> Float[Array, "..."]:
    """`x[index]` for a global time index (every shard gets the value)."""
    axis = sequence_axis()
    L = x.shape[0]
    local = index - time_index(L)[0]
    owned = (local >= 0) & (local < L)
    value = x[jnp.clip(local, 0, L - 1)]
    if axis is None:
        return value
    return lax.psum(jnp.where(owned, value, jnp.zeros_like(value)), axis)


def update_at_time(x: Array, index: Int[Array, ""], value: Array) -> Array:
    """`x.at[index].set(value)` for a global time index (a no-op off its shard)."""
    L = x.shape[0]
    local = index - time_index(L)[0]
    owned = (local >= 0) & (local < L)
    updated = lax.dynamic_update_slice_in_dim(x, value[None], jnp.clip(local, 0, L - 1), 0)
    return jnp.where(owned, updated, x)


def globalise_status(status: PyTree, fs: Float[Array, "L D"]) -> PyTree:
    """Turn the per-shard convergence `Status` of `_iterate.assess` into the global one.

    Per shard, `frontier` is the local first step out of tolerance (0 when all are
    within it); globally it is the first over all shards, and `stalled` checks `f`
    at that step on the shard that owns it.
    """
    axis = sequence_axis()
    if axis is None:
        return status
    L = fs.shape[0]
    offset = time_index(L)[0]
    big = jnp.int32(global_length(L))
    first_bad = jnp.where(status.converged, big, status.frontier + offset)
    frontier = lax.pmin(first_bad, axis)
    converged = frontier == big
    frontier = jnp.where(converged, 0, frontier).astype(status.frontier.dtype)
    residual = lax.pmax(status.residual, axis)
    nonfinite = jnp.any(~jnp.isfinite(fs), axis=1).astype(jnp.int32)
    stalled = ~converged & (at_time(nonfinite, frontier) > 0)
    return eqx.tree_at(
        lambda s: (s.converged, s.frontier, s.residual, s.stalled),
        status,
        (converged, frontier, residual, stalled),
    )


# ---------------------------------------------------------------------------
# Linear recurrences over shards.

Kind = Literal["dense", "diagonal", "block", "transposed", "sum"]


def _apply(kind: Kind, M, c):
    if kind == "sum":
        return c
    if kind == "diagonal":
        return M * c
    if kind == "block":  # M: (n, k, k) blocks acting on the strided layout of `_scan.py`
        n, k = M.shape[0], M.shape[-1]
        cb = c.reshape(k, n).T  # (n, k): unit j of every leaf
        out = jnp.einsum("nij,nj->ni", M, cb, precision=_HIGHEST)
        return out.T.reshape(-1)
    return jnp.einsum("ij,j->i", M, c, precision=_HIGHEST)


def _transfer(kind: Kind, A, reverse: bool, associative: bool):
    """The linear part `M` of the map from the value entering a shard to the one leaving it."""
    if kind == "sum":
        return None
    if kind == "diagonal":
        return jnp.prod(A, axis=0)
    if kind == "transposed":
        A, reverse = jnp.swapaxes(A, -1, -2), True
    # Forward: M = A_L ... A_1; backward: M = A_1 ... A_L. Either way each new
    # factor multiplies from the left in the order the recurrence visits them.
    # (Block-diagonal A: the same products, batched over the blocks.)
    if associative:
        later_first = lambda earlier, later: jnp.matmul(later, earlier, precision=_HIGHEST)
        return lax.associative_scan(later_first, A, reverse=reverse)[0 if reverse else -1]

    def step(M, A_t):
        return jnp.matmul(A_t, M, precision=_HIGHEST), None

    eye = jnp.broadcast_to(jnp.eye(A.shape[-1], dtype=A.dtype), A.shape[1:])
    return lax.scan(step, eye, A, reverse=reverse)[0]


def linear_recurrence(
    kind: Kind,
    solve: Callable[[Array, Array], Array],
    A: Array | None,
    b: Float[Array, "L D"],
    *,
    reverse: bool,
    associative: bool,
) -> Float[Array, "L D"]:
    """A linear recurrence over the sharded time axis, from its unsharded local `solve`.

    `kind` says how the value entering a shard acts: `"dense"`/`"diagonal"`/`"block"`
    (`A` `(L, D, D)`, `(L, D)`, `(L, n, k, k)`): `x_t = A_t x_{t-1} + b_t` (backwards
    with `reverse`); `"transposed"`:
    `x_t = b_t + A_{t+1}ᵀ x_{t+1}` (`_scan.transposed_recurrence`); `"sum"`:
    `x_t = x_{t-1} + b_t`.
    """
    axis = sequence_axis()
    assert axis is not None
    with sharded_over(None):
        x = solve(A, b)  # pyright: ignore[reportArgumentType]
    backwards = reverse or kind == "transposed"
    if kind == "transposed":
        assert A is not None
        v = jnp.einsum("ji,j->i", A[0], x[0], precision=_HIGHEST)
    else:
        v = x[0] if backwards else x[-1]
    M = _transfer(kind, A, reverse, associative)
    Ms = None if M is None else lax.all_gather(M, axis)
    vs = lax.all_gather(v, axis)

    def compose(c, Mv):
        M_p, v_p = Mv
        return _apply(kind, M_p, c) + v_p, c

    _, incoming = lax.scan(compose, jnp.zeros_like(v), (Ms, vs), reverse=backwards)
    c = incoming[_shard_index(axis)]
    edge = -1 if backwards else 0
    if kind in ("dense", "diagonal", "block"):
        assert A is not None
        push = _apply(kind, A[edge], c)
    else:
        push = c
    # On the boundary shard c = 0 and A at the edge may be unused junk.
    boundary = _shard_index(axis) == (_shards(axis) - 1 if backwards else 0)
    b = b.at[edge].add(jnp.where(boundary, jnp.zeros_like(push), push))
    with sharded_over(None):
        return solve(A, b)  # pyright: ignore[reportArgumentType]


def before_first(x: Float[Array, "L ..."], first: Float[Array, "..."]) -> Float[Array, "..."]:
    """The value preceding the local block: `first` on the first shard (or unsharded)."""
    axis = sequence_axis()
    if axis is None:
        return first
    P = _shards(axis)
    from_prev = lax.ppermute(x[-1], axis, perm=[(i, i + 1) for i in range(P - 1)])
    return jnp.where(_shard_index(axis) == 0, first, from_prev)


# ---------------------------------------------------------------------------
# Associative scans over shards (the Kalman filter and smoother elements).


def _scan_local(combine: Callable, elems: PyTree, reverse: bool, associative: bool) -> PyTree:
    """All prefixes (suffixes with `reverse`) of `elems` under `combine(earlier, later)`."""
    if associative:
        if reverse:
            return lax.associative_scan(lambda j, i: combine(i, j), elems, reverse=True)
        return lax.associative_scan(combine, elems)
    tree_map = jax.tree_util.tree_map
    if reverse:
        init, rest = tree_map(lambda x: x[-1], elems), tree_map(lambda x: x[:-1], elems)

        def step(acc, e):
            acc = combine(e, acc)
            return acc, acc

        _, out = lax.scan(step, init, rest, reverse=True)
        return tree_map(lambda o, i: jnp.concatenate([o, i[None]]), out, init)
    init, rest = tree_map(lambda x: x[0], elems), tree_map(lambda x: x[1:], elems)

    def step(acc, e):
        acc = combine(acc, e)
        return acc, acc

    _, out = lax.scan(step, init, rest)
    return tree_map(lambda i, o: jnp.concatenate([i[None], o]), init, out)


def associative_over_shards(
    combine: Callable, elems: PyTree, *, reverse: bool, associative: bool
) -> PyTree:
    """`lax.associative_scan(combine, elems)` over the sharded time axis.

    Local scan; the shard totals are `all_gather`ed and composed over the shards
    (a scan of length `P`) into the total of all earlier (with `reverse`: later)
    shards, which is then combined with every local prefix.
    """
    axis = sequence_axis()
    assert axis is not None
    tree_map = jax.tree_util.tree_map
    local = _scan_local(combine, elems, reverse, associative)
    P = _shards(axis)
    if P == 1:
        return local
    total = tree_map(lambda x: x[0 if reverse else -1], local)
    totals = lax.all_gather(total, axis)
    me = _shard_index(axis)
    if reverse:
        # incoming[p] = totals[p+1] • ... • totals[P-1], for p = 0..P-2
        last = tree_map(lambda x: x[-1], totals)
        rest = tree_map(lambda x: x[1:-1], totals)

        def step(acc, s):
            return combine(s, acc), acc

        # The scan emits S_{p} = totals[p+1] • ... • totals[P-1] for p = 1..P-2 and
        # ends with S_0.
        s0, later = lax.scan(step, last, rest, reverse=True)
        incoming = tree_map(lambda f, x: jnp.concatenate([f[None], x]), s0, later)
        mine = tree_map(lambda x: x[jnp.minimum(me, P - 2)], incoming)
        full = jax.vmap(combine, in_axes=(0, None))(local, mine)
        edge = me == P - 1
    else:
        # incoming[p-1] = totals[0] • ... • totals[p-1], for p = 1..P-1
        first = tree_map(lambda x: x[0], totals)
        rest = tree_map(lambda x: x[1:-1], totals)

        def step(acc, s):
            return combine(acc, s), acc

        # The scan emits C_p = totals[0] • ... • totals[p-1] for p = 1..P-2 and
        # ends with C_{P-1}.
        c_last, earlier = lax.scan(step, first, rest)
        incoming = tree_map(lambda x, f: jnp.concatenate([x, f[None]]), earlier, c_last)
        mine = tree_map(lambda x: x[jnp.maximum(me - 1, 0)], incoming)
        full = jax.vmap(combine, in_axes=(None, 0))(mine, local)
        edge = me == 0
    return tree_map(lambda a, b: jnp.where(edge, a, b), local, full)
