"""Per-iteration cost of every solver, in units of one batched cell evaluation, and where it goes.

    python -m experiments.iteration_cost [--quick] [--D 16 64 256] [--T 10000]
        [--cells gru lstm] [--solvers DEER ELK ...] [--extra 4] [--reps 3]

For each cell (`eqx.nn.GRUCell`, `eqx.nn.LSTMCell` unwrapped), state size `D` and
length `T` (float32, after compilation) it prints and writes
`results/iteration_cost.csv`. Times are the process's CPU time (`--clock cpu`,
the default: on a machine shared with other jobs wall-clock times vary by 2-5x)
or wall-clock time (`--clock wall`, for an idle machine or a GPU):

- `eval_ms`: one batched evaluation of the cell at fixed states (`vmap` over all
  `T`): the unit of every `/eval` column;
- `iter_ms`: the marginal cost of one iteration inside `solve_parallel`,
  `(t(1 + extra) - t(1)) / extra` with `rtol = atol = 0` (so the loop runs
  exactly `max_steps` iterations, unless the residual reaches exactly zero:
  the run uses the `num_steps` it reports) and `polish=False`; fastest of
  `--reps` interleaved repetitions;
- where the time goes, each piece a jitted function timed alone on the same data
  (the iterate after one iteration from the zero guess):
    - `lin_ms`: the solver's linearisation (`solver.init`: `f` and the
      Jacobian, its diagonal or its blocks; for `DEER` on gated cells the
      factored `GatedJacobian`, for `ELK` the dense `T×D×D` array);
    - `scan_ms`: the linear solve of the step: the recurrence (`DEER`: Newton's
      and the globalisation's diagonal one), the Kalman filter (`ELK`,
      `QuasiELK`: as their step calls it, with the solved prefix pinned);
    - `assess_ms`: the loop's bookkeeping: `assess` (residual, frontier) and
      `safeguard`;
    - `step_ms`: one whole `solver.step` alone, outside the loop;
    - `other_ms = iter_ms - lin_ms - scan_ms - assess_ms`: what is left (for
      `DEER` the two proposals' evaluations and the splice; noise otherwise);
- `published_ms`: where `PRNN_PUBLISHED_ELK` points at the folder holding the ELK
  paper's `elk` package (never in CI), the same marginal iteration of its code
  on the same GRU weights: `seq1d` (`quasi=True`: quasi-DEER, `False`: DEER, with
  `full_trace=True`, which runs exactly `max_iter` iterations) and `elk_alg`
  (`quasi=True`: quasi-ELK, `num_iters` iterations); `published / ours` is
  `published_ms / iter_ms`. Its dense ELK (`quasi=False`) calls dynamax's parallel
  Kalman filter with `T - 1` dynamics for `T` emissions, which dynamax 1.x
  rejects, and the dynamax it pins (0.1.5) does not import with a current JAX:
  no published column for `ELK`.

`MultipleShooting`'s pieces are not split (its step is a chunked sequential
sweep); `Picard` is left out of the defaults (it has no use on these cells).
"""

import importlib
import os
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp

import parallel_rnn as prnn
from parallel_rnn._gated import dense_diagonal, is_dense
from parallel_rnn._iterate import assess
from parallel_rnn._kalman import kalman_filter, kalman_smoother
from parallel_rnn._problem import Problem, make_spec
from parallel_rnn._scan import diagonal_recurrence
from parallel_rnn._solver.base import AbstractLinearisedSolver, safeguard
from parallel_rnn._solver.elk import _AbstractELK
from parallel_rnn._structure import flat_cell, registered_rule

from ._common import by_mode, dtype_scope, format_table, parse, study_parser, write_csv


SOLVERS = (
    "DEER",
    "QuasiDEER",
    "ELK",
    "QuasiELK",
    "Jacobi",
    "BlockQuasiDEER",
    "MultipleShooting",
)
ALL_SOLVERS = (*SOLVERS, "Picard")
COLUMNS = (
    "cell",
    "D",
    "T",
    "solver",
    "iter_ms",
    "iter_over_eval",
    "eval_ms",
    "lin_ms",
    "scan_ms",
    "assess_ms",
    "other_ms",
    "step_ms",
    "lin_over_eval",
    "scan_over_eval",
    "published_ms",
    "published_over_ours",
)


# The process's CPU time (all its threads) by default: on a machine shared with
# other jobs, wall-clock times of the same call vary by 2-5x, CPU times by ~10%.
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = CLOCKS["cpu"]


def min_time(fn, reps: int) -> float:
    """Fastest of `reps` runs of `fn()` in seconds (after one warm-up run)."""
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(reps):
        t0 = clock()
        jax.block_until_ready(fn())
        best = min(best, clock() - t0)
    return best


def marginal(run, extra: int, reps: int) -> float:
    """`(t(1 + extra) - t(1)) / extra` seconds, the two timed alternately, fastest of each."""
    jax.block_until_ready(run(1))
    jax.block_until_ready(run(1 + extra))
    best = {1: float("inf"), 1 + extra: float("inf")}
    for _ in range(reps):
        for n in best:
            t0 = clock()
            jax.block_until_ready(run(n))
            best[n] = min(best[n], clock() - t0)
    return (best[1 + extra] - best[1]) / extra


def make_cell(kind: str, D: int, seed: int):
    key = jax.random.key(seed)
    if kind == "gru":
        return eqx.nn.GRUCell(4, D, key=key, dtype=jnp.float32), jnp.zeros(D, jnp.float32)
    if kind == "lstm":
        h = jnp.zeros(D, jnp.float32)
        return eqx.nn.LSTMCell(4, D, key=key, dtype=jnp.float32), (h, h)
    raise ValueError(f"unknown cell {kind!r}")


def make_problem(cell, xs, s0) -> Problem:
    spec = make_spec(s0)
    x_0 = jax.tree_util.tree_map(lambda x: x[0], xs)
    return Problem(flat_cell(cell, x_0, s0, spec, registered_rule(cell)), xs, spec.ravel(s0))


def _linear_solve(solver, problem, it, state, frontier):
    """The linear solve inside `solver.step`, as the step calls it (None: not split)."""
    rhs = it.fs - it.states
    if isinstance(solver, _AbstractELK):
        s = it.states
        t = jnp.arange(s.shape[0])
        lam_t = jnp.where(t <= frontier, jnp.inf, state.lam).astype(s.dtype)
        y = jnp.where((t == frontier)[:, None], rhs, 0)
        posterior = kalman_smoother if solver.posterior == "smoother" else kalman_filter
        return posterior(it.jac, rhs, lam_t, y, method=solver.scan)[0]
    if isinstance(solver, prnn.DEER) and solver.globalise and is_dense(it.jac):
        newton = solver.correction(it.jac, rhs)
        return newton + diagonal_recurrence(dense_diagonal(it.jac), rhs, method=solver.scan)
    if isinstance(solver, AbstractLinearisedSolver):
        return solver.correction(it.jac, rhs)
    return None


def pieces(solver, problem, states, reps: int) -> dict:
    """Seconds of the step's parts, each jitted and timed alone on `states`."""
    init = eqx.filter_jit(lambda p, s: solver.init(p, s))
    it, state = init(problem, states)
    frontier = assess(it, 0.0, 0.0).frontier
    out = dict(lin=min_time(lambda: init(problem, states), reps))
    step = eqx.filter_jit(lambda p, i, st, f: solver.step(p, i, st, f))
    out["step"] = min_time(lambda: step(problem, it, state, frontier), reps)

    def bookkeeping(it, frontier):
        status = assess(it, 0.0, 0.0)
        return safeguard(it.states, it, frontier), status.residual, status.frontier

    book = eqx.filter_jit(bookkeeping)
    out["assess"] = min_time(lambda: book(it, frontier), reps)
    solve = eqx.filter_jit(lambda p, i, st, f: _linear_solve(solver, p, i, st, f))
    if _linear_solve(solver, problem, it, state, frontier) is not None:
        out["scan"] = min_time(lambda: solve(problem, it, state, frontier), reps)
    return out


def published_solvers(path: str, D: int, xs, s0, cell):
    """`{name: run(n)}`: the published code's quasi-DEER, DEER and quasi-ELK, `n` iterations."""
    sys.path.insert(0, path)
    seq1d = importlib.import_module("elk.algs.deer").seq1d
    elk_alg = importlib.import_module("elk.algs.elk").elk_alg
    from .eqx_cells_table import flax_gru_params, flax_gru_step

    params = flax_gru_params(cell)
    guess = jnp.zeros((xs.shape[0], D), xs.dtype)
    f = lambda h, x: flax_gru_step(h, x, params)
    runs = {}
    for name, quasi in (("QuasiDEER", True), ("DEER", False)):
        jitted = jax.jit(
            lambda xs, n, quasi=quasi: seq1d(
                flax_gru_step, s0, xs, params, quasi=quasi, qmem_efficient=quasi,
                max_iter=n, full_trace=True,
            )[0],
            static_argnums=1,
        )  # fmt: skip
        runs[name] = lambda n, jitted=jitted: jitted(xs, n)
    quasi_elk = jax.jit(
        lambda xs, n: elk_alg(f, s0, guess, xs, sigmasq=1e3, num_iters=n, quasi=True),
        static_argnums=1,
    )
    runs["QuasiELK"] = lambda n: quasi_elk(xs, n)
    return runs


def run(args) -> list[dict]:
    Ds = args.D or by_mode(args, smoke=[4], quick=[16, 64], full=[16, 64, 256])
    reps = args.reps or by_mode(args, smoke=1, quick=3, full=5)
    extra = args.extra if not args.smoke else 1
    published = os.environ.get("PRNN_PUBLISHED_ELK")
    rows = []
    for kind in args.cells:
        for D in Ds:
            T = args.T[0] if args.T else by_mode(args, smoke=64, quick=10_000, full=10_000)
            if D >= 256 and not args.T:
                T = by_mode(args, smoke=64, quick=2_000, full=2_000)
            cell, s0 = make_cell(kind, D, args.seed)
            xs = jax.random.normal(jax.random.key(args.seed + 1), (T, 4), jnp.float32)
            problem = make_problem(cell, xs, s0)
            D_flat = problem.init.shape[0]
            unit = eqx.filter_jit(lambda p, s: p.evaluate(s))
            pub = {}
            if published and kind == "gru":
                pub = published_solvers(published, D, xs, s0, cell)
            for name in args.solvers:
                solver = getattr(prnn, name)()
                # Both cells give `DEER` a `GatedJacobian`: no `T×D×D` array on CPU.
                dense = solver.jacobian == "dense" and name != "DEER"
                if dense and T * D_flat**2 * 4 > args.max_dense_gb * 1e9:
                    rows.append(dict(cell=kind, D=D, T=T, solver=name, status="skipped"))
                    continue
                solve = eqx.filter_jit(
                    lambda c, x, s, n, solver=solver: prnn.solve_parallel(
                        c, x, s, solver, max_steps=n, rtol=0.0, atol=0.0, polish=False,
                        throw=False,
                    )
                )  # fmt: skip
                first = solve(cell, xs, s0, 1)
                flat = make_spec(s0).ravel_trajectory(first.states)
                # A solve that reaches a zero residual stops early (MultipleShooting,
                # whose chunks are exact after about T / L iterations).
                more = int(solve(cell, xs, s0, 1 + extra).num_steps) - 1
                if more < 1:
                    rows.append(dict(cell=kind, D=D, T=T, solver=name, status="exact at 1"))
                    continue
                t_iter = marginal(lambda n: solve(cell, xs, s0, n).states, more, reps)
                t_eval = min_time(lambda: unit(problem, flat), reps)
                part = pieces(solver, problem, flat, reps)
                known = part["lin"] + part.get("scan", 0.0) + part["assess"]
                row = dict(
                    cell=kind,
                    D=D,
                    T=T,
                    solver=name,
                    iter_ms=1e3 * t_iter,
                    iter_over_eval=t_iter / t_eval,
                    eval_ms=1e3 * t_eval,
                    lin_ms=1e3 * part["lin"],
                    scan_ms=1e3 * part["scan"] if "scan" in part else None,
                    assess_ms=1e3 * part["assess"],
                    other_ms=1e3 * (t_iter - known) if "scan" in part else None,
                    step_ms=1e3 * part["step"],
                    lin_over_eval=part["lin"] / t_eval,
                    scan_over_eval=part["scan"] / t_eval if "scan" in part else None,
                )
                if name in pub and not (name == "DEER" and T * D**2 * 4 > args.max_dense_gb * 1e9):
                    t_pub = marginal(pub[name], extra, reps)
                    row.update(published_ms=1e3 * t_pub, published_over_ours=t_pub / t_iter)
                rows.append(row)
                print(format_table([row], [c for c in COLUMNS if c in row]), flush=True)
    return rows


def main(argv=None) -> list[dict]:
    p = study_parser(__doc__ or "", solvers=SOLVERS)
    p.add_argument("--cells", nargs="+", default=["gru"], choices=("gru", "lstm"))
    p.add_argument("--extra", type=int, default=4, help="iterations added to time one")
    p.add_argument("--max-dense-gb", type=float, default=2.0)
    p.add_argument(
        "--clock", choices=tuple(CLOCKS), default="cpu", help="process CPU time or wall-clock"
    )
    args = parse(p, argv, solver_names=ALL_SOLVERS)
    global clock
    clock = CLOCKS[args.clock]
    if args.dtype != "float32":
        p.error("--dtype: this study is float32 only")
    with dtype_scope(args):
        rows = run(args)
    print(f"\nfloat32, backend={jax.default_backend()}, per iteration (ms and / one batched eval)")
    print(format_table(rows, [c for c in COLUMNS if any(c in r for r in rows)]))
    write_csv(args.out / "iteration_cost.csv", rows)
    return rows


if __name__ == "__main__":
    main()
