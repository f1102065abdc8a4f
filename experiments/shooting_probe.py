"""Issue 21's multiple-shooting probe (plain JAX) against `MultipleShooting()`.

    python -m experiments.shooting_probe [--quick] [--out results] [--T 2048 16384 65536]
        [--cases ar_gru3:2 ar_gru16:0 ...] [--max-steps 400]

The probe, written against JAX alone as the issue describes it: `P` chunks of
`L = ⌈√T⌉` steps (the last one padded), every chunk run from its entry state
(`vmap` of a `lax.scan`), the chunk maps' exact Jacobians by `jacfwd`, and one
undamped, unsafeguarded Newton step on the entry states per iteration
(`δ_{k+1} = J_k δ_k − r_k`, a `lax.scan` of length `P`), from zero entries. It
stops when every boundary residual meets the library's default float32 test
(`|r| <= tol (1 + |end|)`, `tol = 32·eps`), when the residual is not finite
(reported as `nan`), or after `--max-steps`. `MultipleShooting()` is run at its
defaults on the same case (its `converged` is certified on the whole trajectory).

Outputs (in `--out`): `shooting_probe.csv` (`case`, `T`, `L`, `probe_steps`,
`probe_status` (`converged`, `nan` or `capped`), `ms_steps`, `ms_converged`,
`ms_max_abs_err` against `solve_sequential`, `ms_time_s`: one solve after
compilation, best of `--reps`) and `shooting_probe.png`
(iterations against `T`). `--smoke` runs a small untrained GRU (seconds).
"""

import jax
import jax.numpy as jnp
from jax import lax

import parallel_rnn as prnn
from parallel_rnn._solver.shooting import default_chunk

from ._common import by_mode, format_table, parse, pyplot, save_figure, write_csv
from ._measure import errors
from .chunk_rank import _smoke_case, case_parser, flat_cell, timed_solve


DEFAULT_CASES = ("ar_gru3:2", "ar_gru16:0", "ar_gru16:1", "ar_gru16:2", "ar_lstm:1", "ar_lstm:2")


def probe(fn, xs, s0, L: int, max_steps: int) -> tuple[int, str]:
    """`(iterations, status)` of the undamped multiple-shooting probe on the flat
    cell `fn(x, s) -> s` from zero entries."""
    T = jax.tree_util.tree_leaves(xs)[0].shape[0]
    P = -(-T // L)

    def chunked(x):
        pad = jnp.broadcast_to(x[-1:], (P * L - T, *x.shape[1:]))
        return jnp.concatenate([x, pad]).reshape(P, L, *x.shape[1:])

    x_chunks = jax.tree_util.tree_map(chunked, xs)
    tol = 32 * float(jnp.finfo(s0.dtype).eps)

    def chunk_map(entry, x_chunk):
        return lax.scan(lambda s, x: (fn(x, s), None), entry, x_chunk)[0]

    @jax.jit
    def iterate(ends_guess):
        entries = jnp.concatenate([s0[None], ends_guess[:-1]])
        ends, jacs = jax.vmap(lambda e, x: (chunk_map(e, x), jax.jacfwd(chunk_map)(e, x)))(
            entries, x_chunks
        )
        r = ends_guess - ends

        def boundary(delta, jr):
            delta = jr[0] @ delta - jr[1]
            return delta, delta

        _, delta = lax.scan(boundary, jnp.zeros_like(s0), (jacs, r))
        done = jnp.all(jnp.abs(r) <= tol * (1 + jnp.abs(ends)))
        return ends_guess + delta, done, jnp.all(jnp.isfinite(r))

    guess = jnp.zeros((P, s0.shape[0]), s0.dtype)
    for k in range(max_steps + 1):
        new, done, finite = iterate(guess)
        if not bool(finite):
            return k, "nan"
        if bool(done):
            return k, "converged"
        guess = new
    return max_steps, "capped"


def measure(name, cell, xs, s0, max_steps: int, reps: int) -> dict:
    T = jax.tree_util.tree_leaves(xs)[0].shape[0]
    L = default_chunk(T)
    fn = flat_cell(cell, s0)
    steps, status = probe(fn, xs, fn.spec.ravel(s0), L, max_steps)
    ref = jax.jit(lambda xs, s0: prnn.solve_sequential(cell, xs, s0))(xs, s0)
    sol, best = timed_solve(cell, xs, s0, prnn.MultipleShooting(), reps)
    row = dict(
        case=name, T=T, L=L, probe_steps=steps, probe_status=status,
        ms_steps=int(sol.num_steps), ms_converged=bool(sol.converged),
        ms_max_abs_err=errors(sol.states, ref)[0], ms_time_s=best,
    )  # fmt: skip
    print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return row


def plot(path, rows) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for i, case in enumerate(dict.fromkeys(r["case"] for r in rows)):
        mine = [r for r in rows if r["case"] == case]
        color = f"C{i}"
        ax.plot([r["T"] for r in mine], [r["ms_steps"] for r in mine], "o-", color=color,
                label=f"{case} MultipleShooting()")  # fmt: skip
        ok = [r for r in mine if r["probe_status"] == "converged"]
        ax.plot([r["T"] for r in ok], [r["probe_steps"] for r in ok], "x--", color=color)
    ax.set(xscale="log", yscale="log", xlabel="T", ylabel="iterations",
           title="MultipleShooting() (o) and the probe (x; NaN runs not drawn)")  # fmt: skip
    ax.legend(fontsize="x-small")
    save_figure(fig, path)


def main(argv=None) -> list[dict]:
    p = case_parser((__doc__ or "").splitlines()[0], DEFAULT_CASES, "name:seed")
    p.add_argument("--max-steps", type=int, default=400)
    args = parse(p, argv, solver_names=())
    lengths = args.T or by_mode(args, smoke=(64,), quick=(2048, 16384), full=(2048, 16384, 65536))
    reps = args.reps or 1
    rows: list[dict] = []
    for T in lengths:
        if args.smoke:
            rows.append(measure("gru_smoke", *_smoke_case(T), args.max_steps, reps=1))
            continue
        from ._long_memory import load_case  # noqa: PLC0415 (trains on first use)

        for spec in args.cases:
            name, seed = spec.split(":")
            cell, xs, s0, _ = load_case(name, T, seed=int(seed), verbose=False)
            rows.append(measure(f"{name}_s{seed}", cell, xs, s0, args.max_steps, reps))
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "shooting_probe.csv", rows)
    plot(args.out / "shooting_probe.png", rows)
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
