"""`diagnose`: predict each solver's iterations and cost before the full solve.

The number of iterations a parallel solve needs is not known in advance. Two
cheap measurements describe it:

- the largest Lyapunov exponent `λ` along a short sequential prefix (how fast the
  cell forgets: memory `1/|λ|` steps when `λ < 0`, chaotic when `λ > 0`), reported
  for the user: over a prefix of a few hundred steps it is a finite-time estimate,
  often slightly positive on long-memory models that are contractive over
  thousands of steps, so it does not enter the prediction (forcing linear growth
  when it is positive made the predictions worse on every case measured);
- each solver's iteration counts on two prefixes, of lengths `p/2` and `p`
  (seconds for `p` in the hundreds), whose ratio gives the growth exponent `α`
  in `n(T) ≈ n(p)·(T/p)^α`.

The extrapolation is capped by what each solver guarantees (`T` iterations, or
`P` for multiple shooting), `α` is clipped to `[0, 1]`, and the predicted cost
of the full solve is `(n + 1)·c` sequential steps with `c` from the cost model of
`_cost.py` (or the `costs` given). The recommendation is the cheapest of the
solvers and the sequential scan. Validated in `experiments/predict_cost.py`
(docs/when-parallel-pays.md); wrong where a solver's iteration count changes
regime past the prefix (a cold-start linearisation that only explodes on long
sequences), which a longer prefix catches.
"""

import dataclasses
import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

from ._cost import default_cost
from ._lyapunov import lyapunov_exponent
from ._sequential import solve_sequential
from ._solver.base import AbstractSolver
from ._solver.deer import DEER, QuasiDEER
from ._solver.elk import ELK, QuasiELK
from ._solver.shooting import MultipleShooting
from ._validate import check_inputs


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One solver's forecast: iterations on the prefixes, at `T`, and the cost."""

    prefix_iterations: tuple[int, int]
    growth: float  # α in n(T) ≈ n(p)·(T/p)^α
    iterations: int  # predicted at the full length T
    cost: float  # (iterations + 1)·c, in sequential cell steps
    converged_on_prefix: bool


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    """What `diagnose` found. `str(diagnosis)` is a table."""

    T: int
    prefix: int
    lyapunov_exponent: float  # per step, along the sequential prefix
    memory: float  # 1/|λ| steps if λ < 0, else inf
    predictions: dict[str, Prediction]
    recommendation: str  # a solver's name, or "sequential"

    def __str__(self) -> str:
        lines = [
            f"T = {self.T}, prefix = {self.prefix}, largest Lyapunov exponent "
            f"{self.lyapunov_exponent:+.2e}/step (memory {self.memory:.3g} steps)",
            f"{'solver':<22}{'prefix its':>14}{'alpha':>7}{'its at T':>10}{'cost/seq':>10}",
        ]
        for name, p in self.predictions.items():
            its = f"{p.prefix_iterations[0]}/{p.prefix_iterations[1]}"
            lines.append(
                f"{name:<22}{its:>14}{p.growth:>7.2f}{p.iterations:>10}{p.cost / self.T:>10.3g}"
            )
        lines.append(f"recommended: {self.recommendation}")
        return "\n".join(lines)


def default_candidates() -> dict[str, AbstractSolver]:
    return {
        "DEER": DEER(),
        "QuasiDEER": QuasiDEER(),
        "ELK": ELK(),
        "QuasiELK": QuasiELK(),
        "MultipleShooting": MultipleShooting(),
    }


def _prefix(tree: PyTree, n: int) -> PyTree:
    return jax.tree_util.tree_map(lambda x: x[:n], tree)


def _bound(solver: AbstractSolver, T: int) -> int:
    if isinstance(solver, MultipleShooting):
        return solver.chunks(T)[1]
    return T


def diagnose(
    cell: Callable,
    inputs: PyTree,
    init_state: PyTree,
    *,
    solvers: Mapping[str, AbstractSolver] | None = None,
    prefix: int = 512,
    costs: Mapping[str, float] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    key: jax.Array | None = None,
) -> Diagnosis:
    """Predict, from short prefixes, the iterations and cost of each solver at full `T`.

    **Arguments:**

    - `cell`, `inputs`, `init_state`: as for `solve_parallel`.
    - `solvers`: name → solver to forecast (default: DEER, QuasiDEER, ELK, QuasiELK,
      MultipleShooting).
    - `prefix`: `p`, the longest prefix solved (default 512, at most `T`).
    - `costs`: name → cost of one iteration in sequential steps at the full `T`
      (e.g. from `prnn.calibrate`); default: this backend's cost model.
    - `rtol`, `atol`: the tolerances the full solve will use.
    - `key`: for the Lyapunov exponent's random start vector.

    **Returns:** a `Diagnosis` (`print` it for a table), whose `recommendation` is
    the solver with the smallest predicted cost, or `"sequential"` when none is
    predicted to beat the sequential scan. Not jittable (it runs several solves).
    """
    from ._solve import solve_parallel

    T = check_inputs(inputs)
    p = max(2, min(int(prefix), T))
    solvers = default_candidates() if solvers is None else dict(solvers)
    costs = {} if costs is None else dict(costs)
    D = sum(int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(init_state))

    xs_p = _prefix(inputs, p)
    states = solve_sequential(cell, xs_p, init_state)
    lle = float(lyapunov_exponent(cell, xs_p, states, init_state, key=key))
    memory = 1.0 / -lle if lle < 0 else math.inf

    predictions = {}
    for name, solver in solvers.items():
        counts, ok = [], True
        for n in (max(1, p // 2), p):
            sol = solve_parallel(
                cell, _prefix(inputs, n), init_state, solver,
                rtol=rtol, atol=atol, throw=False, polish=False,
            )  # fmt: skip
            counts.append(int(sol.num_steps))
            ok = ok and bool(jnp.all(sol.converged))
        half, full = counts
        if half > 0 and full > 0 and p >= 4:
            alpha = min(max(math.log(full / half) / math.log(p / max(1, p // 2)), 0.0), 1.0)
        else:
            alpha = 0.0 if full <= 1 else 1.0
        iterations = min(_bound(solver, T), math.ceil(full * (T / p) ** alpha))
        c = costs.get(name, default_cost(solver, T, D))
        predictions[name] = Prediction((half, full), alpha, iterations, (iterations + 1) * c, ok)

    cheapest = min(predictions, key=lambda k: predictions[k].cost, default=None)
    recommendation = "sequential"
    if cheapest is not None and predictions[cheapest].cost < T:
        recommendation = cheapest
    return Diagnosis(T, p, lle, memory, predictions, recommendation)
