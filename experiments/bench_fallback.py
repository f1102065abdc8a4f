"""Per-iteration cost of the autodiff diagonal fallback against closed forms.

    python -m experiments.bench_fallback [--quick] [--D 16 64 256] [--T 10000]

For a GRU (`eqx.nn.GRUCell`), an LSTM (`eqx.nn.LSTMCell`) and a residual MLP
cell `s' = s + W₂ tanh(W₁ s + U x)` (hidden width `D`, closed-form diagonal
`1 + Σ_k W₂[i,k] (1 - a_k²) W₁[k,i]`), float32: the marginal time of one
`QuasiDEER` iteration ((t(9) - t(1)) / 8 at zero tolerance, medians after
compilation) with the closed-form diagonal and with the same cell hidden in a
closure (the autodiff fallback), and their ratio (target ≤ 1.5).
"""

import argparse

import equinox as eqx
import jax
import jax.numpy as jnp

import parallel_rnn as prnn

from ._common import format_table, parser, time_fn, write_csv


class MLPCell(eqx.Module):
    """`s' = s + W₂ tanh(W₁ s + U x)`, with its Jacobian diagonal in closed form."""

    w1: jax.Array
    w2: jax.Array
    u: jax.Array

    def __init__(self, input_size, D, *, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.w1 = jax.random.normal(k1, (D, D), jnp.float32) / D**0.5
        self.w2 = -0.5 * jax.random.normal(k2, (D, D), jnp.float32) / D**0.5
        self.u = jax.random.normal(k3, (D, input_size), jnp.float32)

    def value_and_diagonal_jacobian(self, x, s):
        a = jnp.tanh(self.w1 @ s + self.u @ x)
        diag = 1 + jnp.sum(self.w2 * ((1 - a**2)[None, :] * self.w1.T), axis=1)
        return s + self.w2 @ a, diag

    def __call__(self, x, s):
        return self.value_and_diagonal_jacobian(x, s)[0]


def make(kind, D, key):
    f32 = jnp.float32
    h = jnp.zeros(D, f32)
    if kind == "gru":
        return eqx.nn.GRUCell(4, D, key=key, dtype=f32), h
    if kind == "lstm":
        return eqx.nn.LSTMCell(4, D, key=key, dtype=f32), (h, h)
    return MLPCell(4, D, key=key), h


def per_iteration(cell, xs, s0, reps):
    run = eqx.filter_jit(
        lambda c, n: prnn.solve_parallel(
            c, xs, s0, prnn.QuasiDEER(), max_steps=n, rtol=0.0, atol=0.0, throw=False
        )
    )
    t1, _ = time_fn(lambda: run(cell, 1), reps)
    t9, _ = time_fn(lambda: run(cell, 9), reps)
    return (t9 - t1) / 8


def main(argv=None) -> list[dict]:
    p = parser(__doc__)
    p.add_argument("--D", nargs="+", type=int, default=None)
    p.add_argument("--T", type=int, default=None)
    p.add_argument("--cells", nargs="+", default=["gru", "lstm", "mlp"])
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    Ds = args.D or ([4] if args.smoke else [16, 64] if args.quick else [16, 64, 256])
    T = args.T or (64 if args.smoke else 2_000 if args.quick else 10_000)
    reps = args.reps or (1 if args.smoke else 3)
    rows = []
    for kind in args.cells:
        for D in Ds:
            cell, s0 = make(kind, D, jax.random.key(0))
            xs = jax.random.normal(jax.random.key(1), (T, 4), jnp.float32)
            closed = per_iteration(cell, xs, s0, reps)

            # A closure hides the closed forms: the library falls back to autodiff.
            # `cell` passes as an argument so its weights stay jit inputs.
            class Hidden(eqx.Module):
                inner: eqx.Module

                def __call__(self, x, s):
                    return self.inner(x, s)

            fallback = per_iteration(Hidden(cell), xs, s0, reps)
            rows.append(
                dict(
                    cell=kind,
                    D=D,
                    T=T,
                    closed_ms=1e3 * closed,
                    fallback_ms=1e3 * fallback,
                    ratio=fallback / closed,
                )
            )
            print(rows[-1], flush=True)
    print(f"\nQuasiDEER per-iteration cost, float32, backend={jax.default_backend()}")
    print(format_table(rows))
    write_csv(args.out / "bench_fallback.csv", rows)
    return rows


if __name__ == "__main__":
    main()
