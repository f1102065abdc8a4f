"""`solve_sharded`: `solve_parallel` with the time axis (and a batch axis) split over a mesh."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P
from jaxtyping import PyTree

from ._implicit import Layout, implicit, implicit_reverse, no_gradient
from ._iterate import Outcome, iterate
from ._problem import Problem
from ._shard import sharded_over
from ._solution import Solution
from ._solver.base import AbstractSolver
from ._solver.deer import DEER
from ._structure import JacobianRule, flat_cell, registered_rule
from ._tolerance import default_tolerances
from ._validate import check_cell, check_guess, check_inputs, check_state, normalise_options


def _specs(tree: PyTree, spec: P) -> PyTree:
    return jax.tree_util.tree_map(lambda _: spec, tree)


class _Layout(Layout):
    """The time axis (and a batch axis) split over a mesh (static).

    Every function of a `Problem` and of trajectories runs per shard inside
    `shard_map`, with `sharded_over` set so that the building blocks that look
    across time (`_shard.py`) exchange what they need. `check_vma=False`: the
    collectives are written out, and the cell's jaxpr (`_closure.py`) was traced
    outside `shard_map`, without varying-axes annotations. JAX's transpose of such
    a `shard_map` sums the cotangents of the replicated arguments (the cell's
    parameters, `s_0`) over the shards, which is the gradient's sum over time.
    """

    mesh: Mesh = eqx.field(static=True)
    axis: str = eqx.field(static=True)
    batch: str | None = eqx.field(static=True)

    def map(self, one: Callable, *args):
        """`one` per sequence: vmapped over the local batch when there is one."""
        return jax.vmap(one)(*args) if self.batch is not None else one(*args)

    @property
    def sequence(self) -> P:  # leaves with leading (batch,) time axes
        return P(self.batch, self.axis) if self.batch is not None else P(self.axis)

    @property
    def per_sequence(self) -> P:  # leaves with a leading batch axis, if any
        return P(self.batch) if self.batch is not None else P()

    def run(self, fn: Callable, problem: Problem, args: tuple, out_specs, shared: PyTree = None):
        """`fn(problem, *args, shared)` per sequence, per shard: `args` are trajectories,
        `shared` (arrays or not) is the same for every sequence and shard."""
        fn_dyn, fn_static = eqx.partition(problem.fn, eqx.is_array)
        shared_dyn, shared_static = eqx.partition(shared, eqx.is_array)

        def body(fn_dyn, shared_dyn, inputs, init, *args):
            cell = eqx.combine(fn_dyn, fn_static)
            shared = eqx.combine(shared_dyn, shared_static)

            def one(inputs, init, *args):
                with sharded_over(self.axis, self.batch):
                    return fn(Problem(cell, inputs, init), *args, shared)

            return self.map(one, inputs, init, *args)

        seq = self.sequence
        in_specs = (P(), P(), _specs(problem.inputs, seq), self.per_sequence, *(seq for _ in args))
        run = jax.shard_map(
            body, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
        )
        return run(fn_dyn, shared_dyn, problem.inputs, problem.init, *args)

    def trajectory(self, fn, problem, *trajectories):
        fn_ = lambda problem, *args: fn(problem, *args[:-1])
        return self.run(fn_, problem, trajectories, self.sequence)

    def solve(self, fn, problem, *trajectories):
        fn_ = lambda problem, *args: fn(problem, *args[:-1])
        return self.run(fn_, problem, trajectories, self.outcome_specs(False))

    def check(self, out):
        return _check(out.states, out.converged, _ADJOINT_NOT_CONVERGED)

    def outcome_specs(self, trace: bool, polish: bool = False) -> Any:
        seq, per = self.sequence, self.per_sequence
        estimate = per if polish else None
        return Outcome(seq, per, per, per, per if trace else None, per, estimate)  # type: ignore[arg-type]


def _forward(
    problem, guess, solver, rtol, atol, max_steps, trace, polish, layout: _Layout
) -> Outcome:
    def one(problem, guess, solver):
        return iterate(
            problem,
            solver,
            guess,
            rtol=rtol,
            atol=atol,
            max_steps=max_steps,
            trace=trace,
            polish=polish,
        )

    specs = layout.outcome_specs(trace, polish)
    return layout.run(one, problem, (guess,), specs, shared=solver)


_NOT_CONVERGED = (
    "solve_sharded did not converge: the residual r_t = s_t - f(x_t, s_{t-1}) is still above "
    "atol + rtol*|s_t| somewhere (see `Solution.result` with throw=False for the reason)."
)
_ADJOINT_NOT_CONVERGED = (
    "the derivative (tangent or adjoint solve) of solve_sharded did not converge; the "
    "gradient is not reliable. Check the cotangents and parameters for NaN/inf."
)


def _check(tree: PyTree, converged, message: str) -> PyTree:
    """`eqx.error_if(tree, ~converged, message)`, with the check on a scalar.

    On a sharded array the check's conditional is placed on one device, which
    gathers the whole trajectory there; on a scalar it costs nothing, and adding
    `0 *` the checked scalar keeps the trajectory dependent on it.
    """
    ok = jnp.min(lax.stop_gradient(converged).astype(jnp.int32)) > 0
    flag = lax.stop_gradient(eqx.error_if(jnp.zeros((), jnp.float32), ~ok, message))

    def tie(x):
        if not eqx.is_inexact_array(x):
            return x
        return x + flag.astype(x.dtype)  # flag is 0: only the dependency matters

    return jax.tree_util.tree_map(tie, tree)


def _axis_size(mesh: Mesh, name: str, argument: str) -> int:
    if name not in mesh.shape:
        raise ValueError(
            f"`{argument}`={name!r} is not an axis of `mesh` (axes: {tuple(mesh.shape)})"
        )
    return int(mesh.shape[name])


def solve_sharded(
    cell: Callable,
    inputs: PyTree,
    init_state: PyTree,
    solver: AbstractSolver = DEER(),
    *,
    mesh: Mesh,
    axis_name: str,
    batch_axis: str | None = None,
    guess: PyTree | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int | None = None,
    throw: bool = True,
    trace: bool = False,
    polish: bool = True,
) -> Solution:
    """`solve_parallel` with the time axis split over the mesh axis `axis_name`.

    Every device of the mesh axis `axis_name` (size `P`) holds `T/P` consecutive
    time steps of the inputs, the trajectory and its Jacobians, and runs the
    solver's iteration on them; boundary states, per-shard summaries of the linear
    recurrences and the convergence test are exchanged with collectives (see
    `docs/scaling.md`). The iterates, the iteration count and the gradients are
    those of `solve_parallel` up to round-off.

    **Arguments:** as `solve_parallel` (without the bounded mode, whose sequential
    finish would leave all shards but one idle, and without `MultipleShooting`), plus

    - `mesh`: a `jax.sharding.Mesh` (one host or many, after
      `jax.distributed.initialize`).
    - `axis_name`: the mesh axis the time axis is split over. `T` must be a
      multiple of its size.
    - `batch_axis`: optional mesh axis for a batch of sequences: then every leaf
      of `inputs` (and of `guess`) is `(B, T, ...)` and of `init_state` `(B, ...)`,
      `B` a multiple of the axis size, and every field of the `Solution` gets a
      leading `B`. Each sequence has its own iteration count and convergence flag.

    Place large inputs with `jax.device_put(x, NamedSharding(mesh, P(batch_axis,
    axis_name)))` before the call, so that no device ever holds the whole sequence.
    Differentiable like `solve_parallel` (reverse and forward mode, by the same
    implicit rule); the tangent and adjoint recurrences run over the same shards.
    """
    # The registry is read here, outside the jit: the closed forms registered for
    # the cell's class are a static argument, so a new registration recompiles.
    return _solve_sharded(
        cell,
        inputs,
        init_state,
        solver,
        mesh=mesh,
        axis_name=axis_name,
        batch_axis=batch_axis,
        guess=guess,
        rtol=rtol,
        atol=atol,
        max_steps=max_steps,
        throw=throw,
        trace=trace,
        polish=bool(polish),
        registered=registered_rule(cell),
    )


@eqx.filter_jit
def _solve_sharded(
    cell: Callable,
    inputs: PyTree,
    init_state: PyTree,
    solver: AbstractSolver,
    *,
    mesh: Mesh,
    axis_name: str,
    batch_axis: str | None,
    guess: PyTree | None,
    rtol: float | None,
    atol: float | None,
    max_steps: int | None,
    throw: bool,
    trace: bool,
    polish: bool,
    registered: JacobianRule | None,
) -> Solution:
    if not isinstance(solver, AbstractSolver):
        raise TypeError(f"`solver` must be a parallel_rnn solver (e.g. DEER()); got {solver!r}")
    if not isinstance(mesh, Mesh):
        raise TypeError(f"`mesh` must be a jax.sharding.Mesh; got {mesh!r}")
    n_time = _axis_size(mesh, axis_name, "axis_name")
    rtol, atol, max_steps = normalise_options(rtol, atol, max_steps)
    per_sequence = lambda tree: tree
    if batch_axis is not None:
        if batch_axis == axis_name:
            raise ValueError("`batch_axis` and `axis_name` must be different mesh axes")
        n_batch = _axis_size(mesh, batch_axis, "batch_axis")
        B = check_inputs(inputs)
        init_leaves = jax.tree_util.tree_leaves(init_state)
        if any(jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != B for leaf in init_leaves):
            raise ValueError(
                f"with `batch_axis`, every leaf of `init_state` needs the leading batch axis "
                f"B = {B} of `inputs`; got shapes {[jnp.shape(x) for x in init_leaves]}"
            )
        if B % n_batch:
            raise ValueError(
                f"the batch size B = {B} of `inputs` must be a multiple of the size "
                f"{n_batch} of the mesh axis `batch_axis`={batch_axis!r}"
            )
        per_sequence = lambda tree: jax.tree_util.tree_map(lambda x: x[0], tree)
    T = check_inputs(per_sequence(inputs))
    if T % n_time:
        raise ValueError(
            f"the number of time steps T = {T} of `inputs` must be a multiple of the size "
            f"{n_time} of the mesh axis `axis_name`={axis_name!r} (each device holds T/{n_time} "
            "steps). Pad the sequence at its end (the padded steps do not change the earlier "
            "ones) or pick a T that divides."
        )
    init_one = per_sequence(init_state)
    spec = check_state(init_one)
    x_0 = jax.tree_util.tree_map(lambda x: x[0], per_sequence(inputs))
    check_cell(cell, x_0, init_one)
    default_rtol, default_atol = default_tolerances(spec.dtype)
    rtol = default_rtol if rtol is None else float(rtol)
    atol = default_atol if atol is None else float(atol)
    max_steps = T if max_steps is None else max_steps

    ravel, ravel_trajectory = spec.ravel, spec.ravel_trajectory
    unravel_trajectory = spec.unravel_trajectory
    if batch_axis is not None:
        ravel, ravel_trajectory = jax.vmap(ravel), jax.vmap(ravel_trajectory)
        unravel_trajectory = jax.vmap(unravel_trajectory)
    s0 = ravel(init_state)
    if guess is None:
        guess_flat = jnp.broadcast_to(s0[..., None, :], (*s0.shape[:-1], T, spec.size))
    else:
        check_guess(per_sequence(guess), init_one, T)
        guess_flat = ravel_trajectory(guess)
    # As in `solve_parallel`: a non-finite entry of the guess (or of `init_state`,
    # which the default guess repeats) would come back unchanged wherever the solve
    # stops early.
    fallback = jnp.where(jnp.isfinite(s0), s0, 0)[..., None, :]
    guess_flat = jax.lax.stop_gradient(jnp.where(jnp.isfinite(guess_flat), guess_flat, fallback))

    layout = _Layout(mesh, axis_name, batch_axis)
    problem = Problem(flat_cell(cell, x_0, init_one, spec, registered), inputs, s0)
    out = _forward(
        no_gradient(problem), guess_flat, solver, rtol, atol, max_steps, trace, polish, layout
    )
    if problem.fn.forward_mode:
        states = implicit(
            problem, out.states, solver=solver, rtol=rtol, atol=atol, throw=throw, layout=layout
        )
    else:  # a cell holding a jax.custom_vjp function: reverse mode only
        states = implicit_reverse(problem, out.states, solver, rtol, atol, throw, layout)
    if throw:
        states = _check(states, out.converged, _NOT_CONVERGED)
    return Solution(
        unravel_trajectory(states),
        out.num_steps,
        out.converged,
        out.residual,
        out.trace,
        out.result,
        out.error_estimate,
    )
