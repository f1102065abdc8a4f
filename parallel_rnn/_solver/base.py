"""The solver interface, and the safeguard every solver applies to its proposals."""

import abc
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PyTree

from .._problem import Problem
from .._scan import Method
from .._shard import time_index, time_max


class Iterate(eqx.Module):
    """A trajectory with the cell already evaluated on it.

    - `states`: `(T, D)`, the current `s_1..s_T`;
    - `fs`: `(T, D)`, `f(x_t, s_{t-1})` at `states` (so the residual is `states - fs`);
    - `jac`: the solver's linearisation at `states` (dense `(T, D, D)`, diagonal
      `(T, D)`, or `None`), kept so the next step need not evaluate the cell again;
    - `residual`: `max |states - fs|` (`inf` if not finite), set by the loop from
      its own convergence check so that a step need not compute it again; `None`
      on an iterate a solver has just built.
    """

    states: Float[Array, "T D"]
    fs: Float[Array, "T D"]
    jac: PyTree
    residual: Float[Array, ""] | None = None

    def current_residual(self) -> Float[Array, ""]:
        """`residual`, or `max |states - fs|` where the loop has not set it."""
        if self.residual is not None:
            return self.residual
        return max_residual(self.states, self.fs)


class AbstractSolver(eqx.Module):
    """Base class of the parallel solvers.

    A solver is an immutable configuration. `solve_parallel` drives it:
    `init` builds the first `Iterate` from the guess, then `step` is called until
    the residual meets the tolerance. Each `step` receives `frontier`, the first
    time index whose residual is not yet within tolerance, and must return a
    trajectory in which every step up to and including `frontier` is within
    tolerance (see `safeguard`): this is what bounds every solver by `T` steps.

    `jacobian` says which Jacobian structure the solver's gradient uses: `"dense"`
    solves the adjoint recurrence with a dense reverse scan (`O(T D²)` memory),
    `"diagonal"` by quasi-Newton iterations with diagonal reverse scans (`O(T D)`).
    """

    if TYPE_CHECKING:
        # Pyright takes abstract variables for leading `__init__` fields, which
        # would shift every concrete solver's positional arguments.
        jacobian: ClassVar[Literal["dense", "diagonal"]]

        @property
        def scan(self) -> Method: ...
    else:
        jacobian: eqx.AbstractClassVar[Literal["dense", "diagonal"]]
        scan: eqx.AbstractVar[Method]

    def __check_init__(self):
        # At construction, not when first traced: `DEER(scan="x")` fails here.
        if self.scan not in ("auto", "associative", "sequential"):
            raise ValueError(
                f"`scan` must be 'auto', 'associative' or 'sequential', got {self.scan!r}"
            )

    @abc.abstractmethod
    def init(self, problem: Problem, states: Float[Array, "T D"]) -> tuple[Iterate, Any]:
        """Evaluate the cell on the initial guess; return the iterate and solver state."""

    @abc.abstractmethod
    def step(
        self, problem: Problem, iterate: Iterate, state: Any, frontier: Int[Array, ""]
    ) -> tuple[Iterate, Any]:
        """One iteration: a new trajectory, with the cell evaluated on it."""


def _explosion_bound(dtype) -> float:
    # Far above any sensible state, yet small enough that one more cell step
    # (products, squares) cannot overflow to inf.
    info = jnp.finfo(dtype)
    return float(info.max) ** (0.25 if info.bits >= 32 else 0.5)


def safeguard(
    proposal: Float[Array, "T D"], iterate: Iterate, frontier: Int[Array, ""]
) -> Float[Array, "T D"]:
    """Make a proposed trajectory safe: finite, and exact one step further.

    - Time steps before `frontier` already meet the tolerance: keep them, so
      round-off in the scan cannot undo converged work.
    - The step at `frontier` is set to `f` of its (converged) predecessor, which
      is the sequential answer there: the converged prefix grows by at least one
      step per iteration, so `T` iterations always suffice, in floating point too.
    - Steps that are non-finite or explode revert to the previous iterate (finite
      by induction), so nothing non-finite ever reaches the next linearisation.
    """
    t = time_index(proposal.shape[0])[:, None]  # global time when sequence-sharded
    # One reduction: `|x| <= bound` is false for inf and NaN as well (two, with a
    # separate `isfinite`, cost a second pass over the proposal, 0.1 cell evaluations).
    ok = jnp.abs(proposal) <= _explosion_bound(proposal.dtype)
    bad = ~jnp.all(ok, axis=1, keepdims=True)
    out = jnp.where(bad | (t < frontier), iterate.states, proposal)
    exact = jnp.where(jnp.isfinite(iterate.fs), iterate.fs, iterate.states)
    return jnp.where(t == frontier, exact, out)


def max_abs(x: Float[Array, "T D"]) -> Float[Array, ""]:
    """`max |x|` over the whole (possibly sharded) trajectory; `inf` if not finite."""
    r = jnp.abs(x)
    return time_max(jnp.max(jnp.where(jnp.isfinite(r), r, jnp.inf)))


def max_residual(states: Float[Array, "T D"], fs: Float[Array, "T D"]) -> Float[Array, ""]:
    """`max_t |s_t - f_t|` over the whole (possibly sharded) trajectory; `inf` if not finite."""
    return max_abs(states - fs)


class AbstractLinearisedSolver(AbstractSolver):
    """Undamped solvers: each step solves the linearised recurrence exactly.

    With `Ã_t` the solver's approximation of `A_t = ∂f/∂s(x_t, s_{t-1})`, the
    correction `δ = s_new - s` solves `δ_t = Ã_t δ_{t-1} - r_t` (`δ_0 = 0`), where
    `r_t = s_t - f(x_t, s_{t-1})`: one linear recurrence per step.
    """

    @abc.abstractmethod
    def linearise(self, problem: Problem, states: Float[Array, "T D"]) -> tuple[Array, PyTree]:
        """`(f(x_t, s_{t-1}), Ã)` at `states`."""

    @abc.abstractmethod
    def correction(self, jac: PyTree, rhs: Float[Array, "T D"]) -> Float[Array, "T D"]:
        """Solve `δ_t = Ã_t δ_{t-1} + rhs_t`, `δ_0 = 0`."""

    def init(self, problem, states):
        fs, jac = self.linearise(problem, states)
        return Iterate(states, fs, jac), None

    def step(self, problem, iterate, state, frontier):
        delta = self.correction(iterate.jac, iterate.fs - iterate.states)
        states = safeguard(iterate.states + delta, iterate, frontier)
        fs, jac = self.linearise(problem, states)
        return Iterate(states, fs, jac), state
