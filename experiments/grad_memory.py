"""Memory of the gradient through solve_parallel: QuasiDEER and DEER vs BPTT.

    python -m experiments.grad_memory [--quick] [--out results]

For a `parallel_rnn.cells.GRU` (an `eqx.nn.GRUCell` with closed-form Jacobians)
of hidden size `D` on `T` steps (`--dtype`, default float32), compiles the gradient of
`sum(sin(states))` w.r.t. the cell's parameters three ways:

- **BPTT**: autodiff through `prnn.solve_sequential` (a `lax.scan`);
- **QuasiDEER** / **DEER**: `prnn.solve_parallel` forward with its exact (IFT)
  adjoint: QuasiDEER solves the adjoint with diagonal scans (`O(T D)`), DEER with
  one reverse scan over the `T` Jacobians, which on this gated cell and the
  sequential scan (CPU) are stored factored (`O(T D)`), else dense (`O(T D²)`).

It reports XLA's peak-memory estimate of the compiled program (temporaries +
arguments + outputs, `experiments._common.compiled_memory`). Nothing is run:
only the compiler sees the `T×D` buffers, so the full sizes (`D` up to 64, `T` up to
100000) compile on a laptop CPU. The ratios `bytes / (T·D·itemsize)` and
`bytes / (T·D²·itemsize)` show the scaling: the first stays flat for QuasiDEER and BPTT
as `D` grows, the second stays flat for DEER. Writes `grad_memory.csv` and
`grad_memory.png`.
"""

import time

import equinox as eqx
import jax
import jax.numpy as jnp

import parallel_rnn as prnn

from ._common import (
    by_mode,
    compiled_memory,
    dtype_scope,
    format_table,
    parse,
    progress,
    pyplot,
    save_figure,
    study_parser,
    style,
    write_csv,
)


INPUT_SIZE = 4
METHODS = ("BPTT", "QuasiDEER", "DEER")


def gradient_fn(method: str):
    """The gradient of the loss w.r.t. the cell (`compiled_memory` jits it)."""

    def loss(cell, xs, h0):
        if method == "BPTT":
            states = prnn.solve_sequential(cell, xs, h0)
        else:
            solver = prnn.DEER() if method == "DEER" else prnn.QuasiDEER()
            states = prnn.solve_parallel(cell, xs, h0, solver).states
        return jnp.sum(jnp.sin(states))

    return eqx.filter_grad(loss)


def measure(method: str, D: int, T: int, dtype=jnp.float32, seed: int = 0) -> dict:
    # Small real arguments (parameters, `T×4` inputs); the `T×D` work is compiled only.
    dtype = jnp.dtype(dtype)
    cell = prnn.cells.GRU(INPUT_SIZE, D, key=jax.random.key(seed), dtype=dtype)
    xs = jnp.zeros((T, INPUT_SIZE), dtype)
    h0 = jnp.zeros((D,), dtype)
    t0 = time.perf_counter()
    nbytes = compiled_memory(gradient_fn(method), cell, xs, h0)
    compile_s = time.perf_counter() - t0
    if nbytes is None:
        raise RuntimeError(f"backend {jax.default_backend()} reports no memory analysis")
    return dict(
        solver=method,
        dtype=dtype.name,
        D=D,
        T=T,
        compiled_bytes=nbytes,
        compiled_mib=nbytes / 2**20,
        per_TD=nbytes / (T * D * dtype.itemsize),
        per_TD2=nbytes / (T * D * D * dtype.itemsize),
        compile_s=compile_s,
    )


def run(args) -> list[dict]:
    Ds = args.D or by_mode(args, smoke=(4,), quick=(8, 32), full=(16, 64))
    Ts = args.T or by_mode(args, smoke=(100,), quick=(1_000, 10_000), full=(10_000, 100_000))
    grid = [(m, D, T) for D in Ds for T in Ts for m in args.solvers]
    with dtype_scope(args):
        dtype = jnp.dtype(args.dtype)
        return [measure(m, D, T, dtype, args.seed) for m, D, T in progress(grid, desc="compiling")]


def plot(rows: list[dict], path) -> None:
    Ds = sorted({r["D"] for r in rows})
    Ts = sorted({r["T"] for r in rows})
    plt = pyplot()
    fig, axes = plt.subplots(1, len(Ds), figsize=(5 * len(Ds), 4), sharey=True, squeeze=False)
    for ax, D in zip(axes[0], Ds):
        for method in dict.fromkeys(r["solver"] for r in rows):
            sel = [r for r in rows if r["solver"] == method and r["D"] == D]
            ax.loglog(
                [r["T"] for r in sel],
                [r["compiled_bytes"] for r in sel],
                label=method,
                **style(method),
            )
        for scale, line, label in ((D, ":", "T·D·4"), (D * D, "--", "T·D²·4")):
            ax.loglog(Ts, [4 * T * scale for T in Ts], line, color="grey", label=label)
        ax.set_xlabel("T")
        ax.set_title(f"D = {D}")
        ax.legend()
    axes[0][0].set_ylabel("compiled peak bytes (gradient)")
    save_figure(fig, path)


def main(argv=None) -> list[dict]:
    p = study_parser(__doc__, solvers=METHODS)
    args = parse(p, argv, solver_names=METHODS)
    rows = run(args)
    print(
        f"\ngradient of a cells.GRU solve w.r.t. its parameters, {args.dtype}, "
        f"backend={jax.default_backend()} (compiled, not run)"
    )
    print(format_table(rows))
    write_csv(args.out / "grad_memory.csv", rows)
    plot(rows, args.out / "grad_memory.png")
    print(f"wrote {args.out / 'grad_memory.csv'} and {args.out / 'grad_memory.png'}")
    return rows


if __name__ == "__main__":
    main()
