"""Multiple shooting: any solver on the recurrence of chunk maps, `P` chunks of `L` steps."""

import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, PyTree

from .._problem import FlatCell, Problem, make_spec
from .._scan import Method
from .._shard import sequence_axis
from .base import AbstractSolver, Iterate
from .deer import DEER


def default_chunk(T: int) -> int:
    """`L = ⌈√T⌉`: a sequential depth of `L` per iteration plus `log P` for the
    boundary recurrence, balanced against at most `P = T / L` iterations."""
    return max(1, math.isqrt(max(T - 1, 0)) + 1)


class _ChunkMap(eqx.Module):
    """`(x_chunk (L, ...), e) ↦` the state after running the cell `L` steps from `e`."""

    fn: FlatCell
    step_diagonal: Any  # (x_t, s) -> diag ∂f/∂s, for the quasi solvers' products
    probes: Float[Array, "D r"] | None = None  # Ω of `value_and_low_rank_jacobian`

    def __call__(self, x_chunk: PyTree, entry: Float[Array, " D"]) -> Float[Array, " D"]:
        end, _ = lax.scan(lambda s, x: (self.fn(x, s), None), entry, x_chunk)
        return end

    def diagonal(self, x_chunk: PyTree, entry: Float[Array, " D"]) -> Float[Array, " D"]:
        """The product of the step Jacobians' diagonals along the chunk: the diagonal
        of the chunk map's Jacobian when the cell's Jacobian is diagonal, an
        approximation of it otherwise (quasi-Newton on the boundaries)."""

        def step(carry, x):
            s, prod = carry
            return (self.fn(x, s), prod * self.step_diagonal(x, s)), None

        (_, prod), _ = lax.scan(step, (entry, jnp.ones_like(entry)), x_chunk)
        return prod

    def value_and_low_rank_jacobian(
        self, x_chunk: PyTree, entry: Float[Array, " D"]
    ) -> tuple[Float[Array, " D"], Float[Array, "D D"]]:
        """The end state and `Q Qᵀ J`, `J` the chunk map's Jacobian and `Q` an
        orthonormal basis of `J Ω` (`Ω = self.probes`): the randomized range
        finder, `r` tangents pushed forward and `r` cotangents pulled back through
        the chunk instead of `D` tangents. Exact when `J` has rank `≤ r`;
        otherwise an orthogonal projection of `J`, off by at least its `(r+1)`-th
        singular value (by a small multiple of it, typically)."""
        assert self.probes is not None
        end, jvp = jax.linearize(lambda e: self(x_chunk, e), entry)
        basis, _ = jnp.linalg.qr(jax.vmap(jvp, in_axes=1, out_axes=1)(self.probes))
        vjp = jax.linear_transpose(jvp, entry)
        rows = jax.vmap(lambda q: vjp(q)[0])(basis.T)  # Qᵀ J, (r, D)
        return end, basis @ rows


def _step_diagonal(problem: Problem):
    """`(x_t, s) ↦ diag ∂f/∂s` for one step, the cheapest way the cell allows."""
    fn = problem.fn
    structured = problem._structured_diagonal()
    if fn.diag is not None:
        return fn.diagonal
    if structured is not None:
        return lambda x, s: structured(x, s)[1]
    jacobian = jax.jacfwd if fn.forward_mode else jax.jacrev
    return lambda x, s: jnp.diagonal(jacobian(lambda s_: fn(x, s_))(s))


class MultipleShooting(AbstractSolver):
    """Multiple shooting: the sequence in `P` chunks of `L` steps, and a solver on the
    short recurrence of the chunks' entry states.

    The chunk map `F_k` runs the cell `L` steps from an entry state. The entries
    `e_{k+1} = F_k(e_k)` (`e_0 = s_0`) form a recurrence of length `P` like the
    original one, and `solver` (default `DEER(globalise="picard")`: Newton spliced
    with the Picard step) solves it: each iteration evaluates every chunk
    sequentially from its current
    entry, all chunks side by side (`vmap` of a `lax.scan` of length `L`), with the
    chunk maps' Jacobians (`D` tangents pushed through each chunk for the dense
    solvers; the product of the step Jacobians' diagonals for the quasi ones),
    and solves a linear recurrence of length `P`. The trajectory is then every
    chunk run from its entry.

    Inside a chunk every state is a true trajectory of the cell, so the iterates
    stay on the model's own dynamics: on long-memory cells (gates near 1,
    integrating cell states), where DEER's linearisation along a cold-start guess
    explodes and its iterations grow with `T`, far fewer iterations are needed.

    **Guarantee.** The solver of the chunk recurrence makes at least one more
    chunk exact per iteration, so the exact prefix grows by at least `L` steps and
    at most `P` iterations are needed; each has a sequential depth of `L` steps
    (plus the `log P` of the chunk recurrence), so a solve is never deeper than the
    sequential scan. Entries that are not finite or explode are reverted by that
    solver's safeguard.

    **Arguments:**

    - `chunk`: `L`, the chunk length; default `⌈√T⌉`. `L = T` is the sequential scan
      (0 iterations); `L = 1` is `solver` itself.
    - `solver`: the solver of the chunk recurrence (default
      `DEER(globalise="picard")`: Newton, spliced with the Picard step that moves
      each entry to its predecessor's chunk end). `DEER()` splices with the
      quasi-Newton step instead, built from the diagonal of the chunk Jacobians,
      a product of `L` step diagonals that explodes or vanishes: on
      autoregressive models its iterations grow with `T` until the depth nears
      `T` (156-248 iterations at `T = 65536` against 47-79 with the default;
      docs/accuracy.md), for a few iterations fewer on models that forget.
      `ELK()` damps the boundary steps; `QuasiDEER()` uses
      the products of diagonals (`O(1)` passes per iteration instead of `D + 1`,
      more iterations). Must not itself be a `MultipleShooting`.
    - `rank`: `None` (default) for the chunk maps' exact Jacobians (`D` tangents
      pushed through each chunk); an integer `r < D` for a rank-`r` approximation
      by the randomized range finder (`r` tangents forward and `r` cotangents back
      instead of `D` tangents). Newton on the chunk
      recurrence then converges as with the exact Jacobians when the chunk maps'
      Jacobians have numerical rank `≤ r` (autoregressive models: 1-2 at
      `L = 128`; trained LSTMs: about the number of cell states still
      remembering after `L` steps), and falls back to about one chunk per
      iteration (Picard) when they do not (docs/accuracy.md, measured). Cells
      without forward mode use the exact Jacobians.
    - `scan`: how the gradient's linear recurrences are evaluated (as for `DEER`);
      the chunk recurrence uses `solver.scan`.

    The gradient is that of the exact recurrence, as for every solver (the adjoint
    is solved with the cell's exact Jacobians, as after `DEER`).

    ??? cite "Reference"
        Multiple shooting for boundary-value problems (Bock and Plitt, 1984) and
        parareal (Lions, Maday and Turinici, 2001); here, any parallel Newton
        solver of this library on the chunk maps of an RNN.
    """

    chunk: int | None = None
    solver: AbstractSolver = DEER(globalise="picard")
    rank: int | None = None
    scan: Method = "auto"
    jacobian = "dense"

    def __check_init__(self):
        super().__check_init__()
        if self.chunk is not None and not (isinstance(self.chunk, int) and self.chunk >= 1):
            raise ValueError(f"`chunk` must be None or an integer >= 1, got {self.chunk!r}")
        if self.rank is not None and not (isinstance(self.rank, int) and self.rank >= 1):
            raise ValueError(f"`rank` must be None or an integer >= 1, got {self.rank!r}")
        if not isinstance(self.solver, AbstractSolver) or isinstance(self.solver, MultipleShooting):
            raise TypeError(
                f"`solver` must be a parallel_rnn solver other than MultipleShooting; "
                f"got {self.solver!r}"
            )

    def chunk_length(self, T: int) -> int:
        return min(T, default_chunk(T) if self.chunk is None else self.chunk)

    def chunks(self, T: int) -> tuple[int, int]:
        """`(L, P)`: the chunk length and the number of chunks (the last one padded);
        `P` is also the most iterations a solve can need."""
        L = self.chunk_length(T)
        return L, -(-T // L)

    def _coarse(self, problem: Problem, L: int, P: int) -> Problem:
        D = problem.init.shape[0]
        probes = None
        if self.rank is not None and self.rank < D and problem.fn.forward_mode:
            # Fixed Gaussian probes: the solve stays deterministic, and a fresh
            # draw per iteration would not help (the range of `J Ω` is what counts).
            probes = jax.random.normal(jax.random.key(0), (D, self.rank), problem.init.dtype)
        chunk_map = _ChunkMap(problem.fn, _step_diagonal(problem), probes)
        flat = FlatCell(
            chunk_map,
            chunk_map.diagonal,
            make_spec(problem.init),
            value_and_jac=None if probes is None else chunk_map.value_and_low_rank_jacobian,
            forward_mode=problem.fn.forward_mode,
        )
        return Problem(flat, _chunked_inputs(problem.inputs, P, L), problem.init)

    def init(self, problem: Problem, states):
        if sequence_axis() is not None:
            raise ValueError(
                "MultipleShooting does not support sequence-sharded solves (solve_sharded); "
                "use it with solve_parallel"
            )
        T = states.shape[0]
        L, P = self.chunks(T)
        coarse = self._coarse(problem, L, P)
        # The coarse states are the chunks' end states: rows L-1, 2L-1, ... (the
        # last chunk's end lies in the padding: take the last row for it).
        ends = states[L - 1 :: L]
        if ends.shape[0] < P:
            ends = jnp.concatenate([ends, states[-1:]], axis=0)
        inner, inner_state = self.solver.init(coarse, ends)
        return self._expand(problem, inner, L, T), inner_state

    def step(self, problem, iterate, state, frontier):
        T = iterate.states.shape[0]
        L, P = self.chunks(T)
        inner = iterate.jac
        # The fine frontier sits at the start of the first chunk whose entry (the
        # previous chunk's coarse state) is off: that coarse state's index.
        coarse_frontier = jnp.maximum(frontier // L - 1, 0)
        inner, state = self.solver.step(self._coarse(problem, L, P), inner, state, coarse_frontier)
        return self._expand(problem, inner, L, T), state

    def _expand(self, problem: Problem, inner: Iterate, L: int, T: int) -> Iterate:
        """The fine iterate: every chunk run from its entry `(s_0, c_0, …, c_{P-2})`."""
        entries = jnp.concatenate([problem.init[None], inner.states[:-1]], axis=0)
        P, D = entries.shape
        xs = _chunked_inputs(problem.inputs, P, L)
        fn = problem.fn

        def run(entry, x_chunk):
            return lax.scan(lambda s, x: (fn(x, s), fn(x, s)), entry, x_chunk)[1]

        trajs = jax.vmap(run)(entries, xs)  # (P, L, D)
        states = trajs.reshape(P * L, D)[:T]
        # f(x_t, s_{t-1}) along this trajectory, from the same scans: inside a chunk
        # the next state; at the start of chunk k, f of chunk k - 1's end. So the
        # residual is exactly 0 inside chunks and the frontier moves by whole chunks
        # (the loop's final certification evaluates the cell afresh).
        first_inputs = jax.tree_util.tree_map(lambda x: x[1:, 0], xs)
        at_starts = jax.vmap(fn)(first_inputs, trajs[:-1, -1])
        fs = trajs.at[1:, 0].set(at_starts).reshape(P * L, D)[:T]
        return Iterate(states, fs, inner)


def _chunked_inputs(inputs, P: int, L: int):
    """Inputs as `(P, L, ...)`, the last chunk padded with copies of the last input
    (the padded steps are computed and dropped)."""

    def one(x: Array) -> Array:
        pad = P * L - x.shape[0]
        if pad:
            x = jnp.concatenate([x, jnp.broadcast_to(x[-1:], (pad, *x.shape[1:]))], axis=0)
        return x.reshape(P, L, *x.shape[1:])

    return jax.tree_util.tree_map(one, inputs)
