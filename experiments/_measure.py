"""Measuring solvers on one fixed problem: iterations, time, error, residual and error curves.

Shared by `trained_rnn` and `trained_lm`. Solvers are `(label, solver)` pairs, so a
study's list is extended by appending pairs (any `prnn.AbstractSolver` works).
"""

import time
from collections.abc import Sequence

import equinox as eqx
import jax
import numpy as np

import parallel_rnn as prnn

from ._common import available_solvers


def default_solvers() -> list[tuple[str, prnn.AbstractSolver]]:
    """Every solver of the library at its defaults, labelled by class name."""
    return list(available_solvers().items())


def damping_sweep(lambdas: Sequence[float]) -> list[tuple[str, prnn.AbstractSolver]]:
    """`ELK(damping=λ)` and `QuasiELK(damping=λ)` for each λ (other options at defaults)."""
    return [(f"ELK(damping={lam:g})", prnn.ELK(damping=lam)) for lam in lambdas] + [
        (f"QuasiELK(damping={lam:g})", prnn.QuasiELK(damping=lam)) for lam in lambdas
    ]


def _compiled_solve(cell, xs, s0, solver, **options):
    """`solve_parallel(cell, xs, s0, solver, throw=False, **options)` compiled ahead of
    time (the cell's arrays are arguments), and the compile time in seconds."""
    dynamic, static = eqx.partition(cell, eqx.is_array)

    def solve(dynamic, xs, s0):
        return prnn.solve_parallel(
            eqx.combine(dynamic, static), xs, s0, solver, throw=False, **options
        )

    t0 = time.perf_counter()
    compiled = jax.jit(solve).lower(dynamic, xs, s0).compile()
    return (lambda: compiled(dynamic, xs, s0)), time.perf_counter() - t0


def _flat(states) -> np.ndarray:
    """`(T, D)` float64: the pytree of states with its leaves side by side."""
    leaves = [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(states)]
    return np.concatenate([leaf.reshape(leaf.shape[0], -1) for leaf in leaves], axis=1)


def errors(states, reference) -> tuple[float, float]:
    """Max-abs and mean-abs difference over every state entry (inf where not finite)."""
    diff = np.abs(_flat(states) - _flat(reference))
    if not np.all(np.isfinite(diff)):
        return float("inf"), float("inf")
    return float(diff.max()), float(diff.mean())


def measure(cell, xs, s0, reference, label, solver, *, rtol=None, atol=None, max_steps=None):
    """Solve once from the zero guess, with the residual traced.

    Returns a row (`solver`, `iterations`, `converged`, `residual`, `seconds`: one
    run after ahead-of-time compilation, blocked on; `compile_seconds`;
    `max_abs_err`, `mean_abs_err` against `reference`) and the residual after
    every iteration (a NumPy array, length `iterations`).
    """
    run, compile_s = _compiled_solve(
        cell, xs, s0, solver, rtol=rtol, atol=atol, max_steps=max_steps, trace=True
    )
    t0 = time.perf_counter()
    sol = jax.block_until_ready(run())
    seconds = time.perf_counter() - t0
    n = int(sol.num_steps)
    max_err, mean_err = errors(sol.states, reference)
    row = dict(
        solver=label,
        iterations=n,
        converged=bool(sol.converged),
        residual=float(sol.residual),
        seconds=seconds,
        compile_seconds=compile_s,
        max_abs_err=max_err,
        mean_abs_err=mean_err,
    )
    return row, np.asarray(sol.trace)[:n]


def log_grid(last: int, per_decade: int = 4) -> list[int]:
    """Iteration counts `1 ≤ k ≤ last`, log-spaced, always with `last`."""
    ks = np.unique(np.round(np.logspace(0, np.log10(max(last, 1)), 1 + per_decade * 5)).astype(int))
    ks = [int(k) for k in ks if k <= last]
    return sorted(set(ks) | {last})


def error_curve(cell, xs, s0, reference, solver, ks, *, rtol=None, atol=None):
    """Max-abs and mean-abs error against `reference` of the iterate after `k` iterations,
    for each `k` in `ks`, by re-solving from the zero guess with `max_steps=k` (no
    dependence on the solver's internals). Rows: `iteration`, `max_abs_err`, `mean_abs_err`."""
    rows = []
    for k in ks:
        run, _ = _compiled_solve(cell, xs, s0, solver, rtol=rtol, atol=atol, max_steps=k)
        max_err, mean_err = errors(run().states, reference)
        rows.append(dict(iteration=k, max_abs_err=max_err, mean_abs_err=mean_err))
    return rows
