"""The cost model of the bounded mode: one parallel iteration in sequential cell steps.

`switch_cost` turns the `bounded=` option into the number `c` that `_bounded.py`'s
rule needs. `True` takes this backend's default model below; a number is used as
given (e.g. from `calibrate`, which measures it).

The defaults are per solver family, from measurements (docs/when-parallel-pays.md):

- CPU: an iteration is work over all `T` steps, so `c = κ·T`, with `κ` the cost of
  one iteration per time step relative to one step of the sequential scan.
  Every measured `κ` is above 1 (the CPU has no parallelism to spend), so on a
  CPU the bounded mode evaluates sequentially.
- GPU (and other accelerators): an iteration's depth is `O(log T)` (`O(L)` for
  multiple shooting), so `c = a + b·log2(T)` sequential steps, `b` larger for
  dense `D×D` scans.
"""

import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

from ._solver.base import AbstractSolver


# κ: CPU cost of one iteration per time step, in sequential scan steps, measured
# with `calibrate` on eqx.nn.GRUCell (D = 16, T = 1e4 and D = 64, T = 4000, 2-core
# CPU; `python -m experiments.calibration`), rounded up. Multiple shooting with
# exact chunk Jacobians scales with the D + 1 passes it pushes through each chunk.
_CPU_KAPPA = {
    "dense": 8.0,
    "elk": 90.0,
    "quasi_elk": 3.0,
    "diagonal": 1.0,
    "shooting": 0.5,
    "shooting_exact": 0.4,  # times D + 1
}
# GPU: c = a + b·log2(T) sequential steps. Provisional: no GPU was lent to this
# project's sessions yet; `calibrate` measures the real figure on any backend.
_GPU_COST = {
    "dense": (16.0, 16.0),
    "elk": (32.0, 32.0),
    "quasi_elk": (16.0, 8.0),
    "diagonal": (8.0, 4.0),
}


def check_bounded(bounded) -> bool | float:
    if isinstance(bounded, bool):
        return bounded
    try:
        value = float(bounded)
    except (TypeError, ValueError):
        raise TypeError(
            f"`bounded` must be True, False or a positive number (the cost of one "
            f"iteration in sequential steps); got {bounded!r}"
        ) from None
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"`bounded` must be a positive finite number; got {bounded!r}")
    return value


def _family(solver: AbstractSolver) -> str:
    from ._solver.elk import ELK, QuasiELK
    from ._solver.shooting import MultipleShooting

    if isinstance(solver, MultipleShooting):
        return "shooting_exact" if solver.solver.jacobian == "dense" else "shooting"
    if isinstance(solver, ELK):
        return "elk"
    if isinstance(solver, QuasiELK):
        return "quasi_elk"
    return "dense" if solver.jacobian == "dense" else "diagonal"


def default_cost(solver: AbstractSolver, T: int, D: int, backend: str | None = None) -> float:
    """This backend's default cost of one `solver` iteration, in sequential steps."""
    backend = jax.default_backend() if backend is None else backend
    family = _family(solver)
    if backend == "cpu":
        kappa = _CPU_KAPPA[family]
        if family == "shooting_exact":
            kappa *= 1 + D  # D tangents pushed through every chunk
        return kappa * T
    if family.startswith("shooting"):
        L = solver.chunk_length(T)  # pyright: ignore[reportAttributeAccessIssue]
        return float(L + math.log2(max(T // L, 1)) + 1)  # its depth in sequential steps
    a, b = _GPU_COST[family]
    return a + b * math.log2(max(T, 2))


def switch_cost(bounded: bool | float, solver: AbstractSolver, T: int, D: int) -> float | None:
    """`None` (not bounded) or the cost `c` for the switching rule."""
    if bounded is False:
        return None
    if bounded is True:
        return default_cost(solver, T, D)
    return float(bounded)


_CALIBRATION: dict = {}


def calibrate(
    cell: Callable,
    inputs: PyTree,
    init_state: PyTree,
    solver: AbstractSolver,
    *,
    reps: int = 3,
) -> float:
    """Measure the cost of one `solver` iteration in sequential cell steps, here.

    Times `solve_parallel` stopped after 1 and after 5 iterations (zero tolerance, so
    that no solve stops early; the difference is four iterations) and
    `solve_sequential`, each compiled first, the fastest of `reps` runs (load on the
    machine only adds time). Never below a hundredth of `T`. Cached per cell class
    and structure, input and state shapes, `T`, solver and backend. Pass the result
    as `solve_parallel(..., bounded=c)`.
    """
    from ._sequential import solve_sequential
    from ._solve import solve_parallel

    shapes = jax.tree_util.tree_map(
        lambda a: (np.shape(a), str(jnp.asarray(a).dtype)), (inputs, init_state)
    )
    key = (
        type(cell),
        jax.tree_util.tree_structure(cell),
        str(shapes),
        solver,
        jax.default_backend(),
    )
    if key in _CALIBRATION:
        return _CALIBRATION[key]
    T = jax.tree_util.tree_leaves(inputs)[0].shape[0]

    def fastest(fn) -> float:
        jax.block_until_ready(fn())
        best = math.inf
        for _ in range(reps):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            best = min(best, time.perf_counter() - start)
        return best

    def parallel(k):
        return lambda: (
            solve_parallel(
                cell,
                inputs,
                init_state,
                solver,
                max_steps=k,
                throw=False,
                polish=False,
                rtol=0.0,
                atol=0.0,
            ).states
        )

    per_iteration = max(fastest(parallel(5)) - fastest(parallel(1)), 0.0) / 4
    per_step = fastest(lambda: solve_sequential(cell, inputs, init_state)) / T
    cost = max(per_iteration / per_step, T / 100)
    _CALIBRATION[key] = cost
    return cost
