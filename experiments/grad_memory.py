"""Memory of the gradient through solve_parallel: QuasiDEER O(T·D) vs DEER O(T·D²) vs BPTT.

    python -m experiments.grad_memory [--quick] [--out results]

For a `parallel_rnn.cells.GRU` (an `eqx.nn.GRUCell` with closed-form Jacobians)
of hidden size `D` on `T` steps (float32), compiles the gradient of
`sum(sin(states))` w.r.t. the cell's parameters three ways:

- **BPTT**: autodiff through `prnn.solve_sequential` (a `lax.scan`);
- **QuasiDEER** / **DEER**: `prnn.solve_parallel` forward with its exact (IFT)
  adjoint: QuasiDEER solves the adjoint with diagonal scans (`O(T D)`), DEER with
  one dense reverse scan over the `T` Jacobians (`O(T D²)`).

It reports XLA's peak-memory estimate of the compiled program (temporaries +
arguments + outputs, `experiments._common.compiled_memory`). Nothing is run:
only the compiler sees the `T×D` buffers, so the full sizes (`D` up to 64, `T` up to
100000) compile on a laptop CPU. The ratios `bytes / (T·D·4)` and
`bytes / (T·D²·4)` show the scaling: the first stays flat for QuasiDEER and BPTT
as `D` grows, the second stays flat for DEER. Writes `grad_memory.csv` and
`grad_memory.png`.
"""

import argparse
import time

import equinox as eqx
import jax
import jax.numpy as jnp

import parallel_rnn as prnn

from ._common import compiled_memory, format_table, parser, progress, pyplot, write_csv


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


def measure(method: str, D: int, T: int) -> dict:
    # Small real arguments (parameters, `T×4` inputs); the `T×D` work is compiled only.
    cell = prnn.cells.GRU(INPUT_SIZE, D, key=jax.random.key(0), dtype=jnp.float32)
    xs = jnp.zeros((T, INPUT_SIZE), jnp.float32)
    h0 = jnp.zeros((D,), jnp.float32)
    t0 = time.perf_counter()
    nbytes = compiled_memory(gradient_fn(method), cell, xs, h0)
    compile_s = time.perf_counter() - t0
    if nbytes is None:
        raise RuntimeError(f"backend {jax.default_backend()} reports no memory analysis")
    return dict(
        method=method,
        D=D,
        T=T,
        bytes=nbytes,
        MiB=nbytes / 2**20,
        per_TD=nbytes / (T * D * 4),
        per_TD2=nbytes / (T * D * D * 4),
        compile_s=compile_s,
    )


def main(argv=None) -> list[dict]:
    p = parser(__doc__)
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    Ds = (4,) if args.smoke else (8, 32) if args.quick else (16, 64)
    Ts = (100,) if args.smoke else (1_000, 10_000) if args.quick else (10_000, 100_000)

    grid = [(m, D, T) for D in Ds for T in Ts for m in METHODS]
    rows = [measure(m, D, T) for m, D, T in progress(grid, desc="compiling")]
    print(
        f"\ngradient of a cells.GRU solve w.r.t. its parameters, float32, "
        f"backend={jax.default_backend()} (compiled, not run)"
    )
    print(format_table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "grad_memory.csv", rows)

    plt = pyplot()
    fig, axes = plt.subplots(1, len(Ds), figsize=(5 * len(Ds), 4), sharey=True, squeeze=False)
    for ax, D in zip(axes[0], Ds):
        for method, marker in zip(METHODS, "os^"):
            sel = [r for r in rows if r["method"] == method and r["D"] == D]
            ax.loglog([r["T"] for r in sel], [r["bytes"] for r in sel], marker=marker, label=method)
        for scale, style, label in ((D, ":", "T·D·4"), (D * D, "--", "T·D²·4")):
            ax.loglog(Ts, [4 * T * scale for T in Ts], style, color="grey", label=label)
        ax.set_xlabel("T")
        ax.set_title(f"D = {D}")
        ax.legend()
    axes[0][0].set_ylabel("compiled peak bytes (gradient)")
    fig.tight_layout()
    fig.savefig(args.out / "grad_memory.png", dpi=120)
    print(f"wrote {args.out / 'grad_memory.csv'} and {args.out / 'grad_memory.png'}")
    return rows


if __name__ == "__main__":
    main()
