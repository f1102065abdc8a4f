"""Multiple shooting: Newton on the entry states of `P` chunks of `L` steps."""

import math
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from .._problem import Problem
from .._scan import Method, linear_recurrence
from .._shard import sequence_axis
from .base import AbstractSolver, Iterate, _explosion_bound


ChunkJacobian = Literal["exact", "diagonal"]


def default_chunk(T: int) -> int:
    """`L ≈ √T`: a sequential depth of `L` per iteration plus `log P` for the
    boundary recurrence, balanced against at most `P = T / L` iterations."""
    return max(1, math.isqrt(max(T - 1, 0)) + 1)


class MultipleShooting(AbstractSolver):
    """Newton's method on the entry states of chunks of the sequence.

    The sequence is split into `P` chunks of `L` steps. Each iteration

    1. runs every chunk sequentially from its current entry state, all chunks side
       by side (`vmap` over chunks of one `lax.scan` of length `L`), together with
       the chunk map's Jacobian `J_k = ∂(end state)/∂(entry state)`, pushed
       forwards through the same scan (`D` tangents);
    2. takes one Newton step on the `P` entry states, `δ_{k+1} = J_k δ_k + (e_k^end
       - e_{k+1})`, a linear recurrence of length `P` (the library's scans).

    Inside a chunk every state is a true trajectory of the cell, so the iterates
    never leave the model's own dynamics: on long-memory cells (gates near 1,
    integrating cell states), where DEER's linearisation along a cold-start guess
    explodes and its iterations grow with `T`, a few iterations suffice.

    **Guarantee.** The chunk holding the solver's frontier starts from an exact
    state, so after one iteration it and the next chunk (whose entry is set to the
    exact end of that chunk) are exact: the converged prefix grows by more than
    `L` steps per iteration, and at most `P - 1` iterations are ever needed (after
    the first pass from the guess, which already makes chunk 0 exact). Each
    iteration has a sequential depth of `L` steps (plus `log P`), so a solve is
    never deeper than the sequential scan. Entry states that are not finite or
    explode revert to their previous value.

    **Arguments:**

    - `chunk`: `L`, the chunk length; default `⌈√T⌉`. `L = T` is the sequential
      scan (0 iterations), `L = 1` is Newton on every step (DEER's iteration, with
      a dense `D×D` boundary Jacobian).
    - `jacobians`: `"exact"` (default: the chunk maps' Jacobians by forward-mode
      autodiff, `D` tangents through each chunk, `O(D)` times the work of a pass)
      or `"diagonal"` (the product of the diagonals of the step Jacobians along
      the chunk: `O(1)` times the work of a pass, quasi-Newton on the boundaries,
      more iterations).
    - `globalise`: keep the Newton step only on the chunks where it helps (default
      `True`). From a cold start the chunk maps' linearisations far from the frontier
      are poor and undamped Newton entries there can explode; each iteration takes
      the new chunks before a split `c` and keeps the previous ones from `c` on, with
      the `c` (past the frontier's chunk, so progress is kept) whose boundary gaps
      `|e_{k+1} - end_k|` have the smallest maximum. This needs no extra cell
      evaluation; `False` takes the full Newton step.
    - `scan`: how the boundary recurrence of length `P` is evaluated (as for
      `DEER`); the gradient's recurrences use it too.

    The gradient is that of the exact recurrence, as for every solver (the adjoint
    is solved with the cell's exact Jacobians, as after `DEER`).

    ??? cite "Reference"
        Multiple shooting for boundary-value problems (Bock and Plitt, 1984) and
        the parareal family; chunked Newton for RNNs as probed in this project's
        long-memory study.
    """

    chunk: int | None = None
    jacobians: ChunkJacobian = "exact"
    scan: Method = "auto"
    globalise: bool = True
    jacobian = "dense"

    def __check_init__(self):
        super().__check_init__()
        if self.chunk is not None and not (isinstance(self.chunk, int) and self.chunk >= 1):
            raise ValueError(f"`chunk` must be None or an integer >= 1, got {self.chunk!r}")
        if self.jacobians not in ("exact", "diagonal"):
            raise ValueError(f"`jacobians` must be 'exact' or 'diagonal', got {self.jacobians!r}")

    def _length(self, T: int) -> int:
        return min(T, default_chunk(T) if self.chunk is None else self.chunk)

    def init(self, problem: Problem, states):
        if sequence_axis() is not None:
            raise ValueError(
                "MultipleShooting does not support sequence-sharded solves (solve_sharded); "
                "use it with solve_parallel"
            )
        T = states.shape[0]
        L = self._length(T)
        entries = _entries(problem.shift(states), L)
        return self._pass(problem, entries, L, T), None

    def step(self, problem, iterate, state, frontier):
        T = iterate.states.shape[0]
        L = self._length(T)
        J, ends, entries = iterate.jac
        P = entries.shape[0]
        # δ_0 = 0 (chunk 0 starts at s_0); δ_{k+1} = J_k δ_k + (end_k - e_{k+1}).
        gap = ends[:-1] - entries[1:]
        if P > 1:
            delta = linear_recurrence(J[:-1], gap, method=self.scan)
            proposal = entries[1:] + delta
        else:
            proposal = entries[1:]
        proposal = _safe(proposal, entries[1:])
        # Every entry at or before the frontier follows an exact prefix: give it the
        # exact end of the chunk before (the chunk at the frontier then becomes
        # exact), whatever round-off in the Newton step says.
        starts = (jnp.arange(1, P, dtype=frontier.dtype) * L)[:, None]
        new = jnp.where(starts <= frontier, ends[:-1], proposal)
        newton = self._pass(problem, jnp.concatenate([entries[:1], new], axis=0), L, T)
        if not self.globalise or P == 1:
            return newton, state
        return _splice(newton, iterate, frontier // L + 1, L), state

    def _pass(self, problem: Problem, entries: Float[Array, "P D"], L: int, T: int) -> Iterate:
        """Run every chunk from its entry; the iterate holds `(J, ends, entries)` as its
        `jac` (the entries are not in the trajectory: its row `kL - 1` is the end of
        chunk `k - 1`, and row `kL` is the cell applied to the entry `e_k`)."""
        P, D = entries.shape
        xs = _chunked_inputs(problem.inputs, P, L)
        fn = problem.fn

        def run(entry, x_chunk):
            def step(s, x):
                s = fn(x, s)
                return s, s

            end, traj = lax.scan(step, entry, x_chunk)
            return end, traj

        if self.jacobians == "exact":

            def chunk_map(entry, x_chunk):
                end, traj = run(entry, x_chunk)
                return end, (end, traj)

            J, (ends, trajs) = jax.vmap(jax.jacfwd(chunk_map, has_aux=True))(entries, xs)
        else:
            ends, trajs = jax.vmap(run)(entries, xs)
            # Each step's predecessor: the chunk's entry, then its own states.
            prev = jnp.concatenate([entries[:, None], trajs[:, :-1]], axis=1)
            diag = problem.diagonal_at(prev.reshape(P * L, D)[:T])
            diag = jnp.concatenate([diag, jnp.ones((P * L - T, D), diag.dtype)], axis=0)
            J = jnp.prod(diag.reshape(P, L, D), axis=1)  # diagonal chunk maps
        states = trajs.reshape(P * L, D)[:T]
        # f(x_t, s_{t-1}) along this trajectory: inside a chunk it is the next state
        # (the scan evaluated it); at the start of chunk k it is f applied to the end
        # of chunk k - 1. Taking it from the same scan keeps the residual exactly 0
        # inside chunks, so the frontier only ever sits at a chunk start and moves
        # by whole chunks; the loop's final certification re-evaluates the cell.
        first_inputs = jax.tree_util.tree_map(lambda x: x[1:, 0], xs)
        at_starts = jax.vmap(fn)(first_inputs, ends[:-1])  # (P - 1, D)
        fs = trajs.at[1:, 0].set(at_starts).reshape(P * L, D)[:T]
        return Iterate(states, fs, (J, ends, entries))

def _chunk_gaps(it: Iterate) -> Float[Array, " P-1"]:
    _, ends, entries = it.jac
    g = jnp.max(jnp.abs(ends[:-1] - entries[1:]), axis=1)
    return jnp.where(jnp.isfinite(g), g, jnp.inf)


def _splice(new: Iterate, old: Iterate, first: Int[Array, ""], L: int) -> Iterate:
    """`new`'s chunks before `c`, `old`'s from `c` on, for the `c >= first` whose
    boundary gaps have the smallest maximum (the largest such `c`)."""
    _, ends_new, _ = new.jac
    _, _, entries_old = old.jac
    P = ends_new.shape[0]
    g_new, g_old = _chunk_gaps(new), _chunk_gaps(old)  # boundary k: chunk k -> k + 1
    joint = jnp.max(jnp.abs(ends_new[:-1] - entries_old[1:]), axis=1)  # gap at c = k + 1
    joint = jnp.where(jnp.isfinite(joint), joint, jnp.inf)
    zero = jnp.zeros((1,), g_new.dtype)
    # For c = 1..P-1: max(new gaps before boundary c-1, the joint gap, old gaps after).
    before = jnp.concatenate([zero, lax.cummax(g_new)[:-1]])
    after = jnp.concatenate([lax.cummax(g_old, reverse=True)[1:], zero])
    merit = jnp.maximum(jnp.maximum(before, joint), after)
    merit = jnp.concatenate([merit, jnp.max(g_new, keepdims=True)])  # c = 1..P
    c = jnp.arange(1, P + 1, dtype=first.dtype)
    merit = jnp.where(c >= first, merit, jnp.inf)
    best = jnp.min(merit)
    c = jnp.max(jnp.where(merit <= best, c, first))
    t = jnp.arange(new.states.shape[0], dtype=c.dtype)[:, None]
    rows = t < c * L
    states = jnp.where(rows, new.states, old.states)
    fs = jnp.where(t <= c * L, new.fs, old.fs)  # f at row cL is f of new's end
    per_chunk = lambda a, b: jnp.where((jnp.arange(P, dtype=c.dtype) < c).reshape(-1, *[1] * (a.ndim - 1)), a, b)
    jac = jax.tree_util.tree_map(per_chunk, new.jac, old.jac)
    return Iterate(states, fs, jac)


def _entries(prev: Float[Array, "T D"], L: int) -> Float[Array, "P D"]:
    """`s_{kL}` for each chunk `k`, read off the shifted trajectory `(s_0..s_{T-1})`."""
    return prev[::L]


def _chunked_inputs(inputs, P: int, L: int):
    """Inputs as `(P, L, ...)`, the last chunk padded with copies of the last input
    (the padded steps are computed and dropped)."""

    def one(x: Array) -> Array:
        T = x.shape[0]
        pad = P * L - T
        if pad:
            x = jnp.concatenate([x, jnp.broadcast_to(x[-1:], (pad, *x.shape[1:]))], axis=0)
        return x.reshape(P, L, *x.shape[1:])

    return jax.tree_util.tree_map(one, inputs)


def _safe(proposal: Float[Array, "P D"], previous: Float[Array, "P D"]) -> Float[Array, "P D"]:
    bad = ~jnp.all(jnp.isfinite(proposal), axis=1, keepdims=True) | jnp.any(
        jnp.abs(proposal) > _explosion_bound(proposal.dtype), axis=1, keepdims=True
    )
    return jnp.where(bad, previous, proposal)

