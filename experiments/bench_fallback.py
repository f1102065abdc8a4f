"""Per-iteration cost of the generic diagonal fallbacks against closed forms.

    python -m experiments.bench_fallback [--quick] [--D 16 64 256] [--T 10000]

For a GRU (`eqx.nn.GRUCell`), an LSTM (`eqx.nn.LSTMCell`) and a residual MLP
cell `s' = s + W₂ tanh(W₁ s + U x)` (hidden width `D`, closed-form diagonal
`1 + Σ_k W₂[i,k] (1 - a_k²) W₁[k,i]`), float32: the marginal time of one
`QuasiDEER` iteration ((t(17) - t(1)) / 16 at zero tolerance, fastest of `--reps` after
compilation) with the closed-form diagonal, and with the same cell hidden in a
wrapper, where the library reads the diagonal off the cell's jaxpr
(`jaxpr_ms`, `_jaxpr_diagonal.py`) or, with that switched off, takes `D` JVP
passes (`autodiff_ms`); and the ratios to the closed form (target ≤ 1.5). The `lin_*` columns time
the linearisation alone (`f` and its diagonal at all `T` steps), which is the
only part of the iteration that differs, and is less noisy.
"""

import argparse
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp

import parallel_rnn as prnn
from parallel_rnn import _jaxpr_diagonal
from parallel_rnn._problem import Problem, make_spec
from parallel_rnn._structure import flat_cell

from ._common import format_table, number, parser, time_fn, write_csv


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
    # Divided by the iterations actually run (a solve that stalls on non-finite
    # values stops early), over 16 of them: on the shared 2-core CPU the
    # difference of two noisy times needs the margin.
    t1 = best_time(lambda: run(cell, 1), reps)
    t17 = best_time(lambda: run(cell, 17), reps)
    steps = int(run(cell, 17).num_steps) - int(run(cell, 1).num_steps)
    return (t17 - t1) / max(steps, 1)


def linearisation(cell, xs, s0, reps):
    """Time of `f` and its diagonal over all `T` steps alone (what the fallback changes)."""
    spec = make_spec(s0)
    states = jax.random.normal(jax.random.key(2), (xs.shape[0], spec.size), spec.dtype)

    @eqx.filter_jit
    def run(cell, xs, states):
        fn = flat_cell(cell, xs[0], s0, spec)
        return Problem(fn, xs, spec.ravel(s0)).linearise_diagonal(states)

    return best_time(lambda: run(cell, xs, states), reps)


def best_time(fn, reps) -> float:
    """Fastest of `reps` timed calls after compilation: on a machine shared with
    other jobs, contention only ever adds time, so the minimum is the least noisy."""
    jax.block_until_ready(fn())
    return min(time_fn(fn, 1, warmup=0)[0] for _ in range(reps))


class Hidden(eqx.Module):
    """A wrapper that hides the cell's closed forms from the library."""

    inner: Callable  # passed as a field so its weights stay jit inputs

    def __call__(self, x, s):
        return self.inner(x, s)


class HiddenJVP(Hidden):
    """The same, as another class: another jit cache entry, traced with the switch off."""


def measure(cell, xs, s0, reps, *, jaxpr: bool) -> tuple[float, float]:
    """(per-iteration, linearisation) seconds; `jaxpr=False` forces the `D`-JVP fallback."""
    # The switch is read when a solve is traced; a cached trace of the same cell
    # class would keep the other path, hence `HiddenJVP` and the cleared caches.
    jax.clear_caches()
    _jaxpr_diagonal.ENABLED = jaxpr
    try:
        return per_iteration(cell, xs, s0, reps), linearisation(cell, xs, s0, reps)
    finally:
        _jaxpr_diagonal.ENABLED = True


def main(argv=None) -> list[dict]:
    p = parser(__doc__ or "")
    p.add_argument("--D", nargs="+", type=number, default=None)
    p.add_argument("--T", type=number, default=None)
    p.add_argument("--cells", nargs="+", default=["gru", "lstm", "mlp"])
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    Ds = args.D or ([4] if args.smoke else [16, 64] if args.quick else [16, 64, 256])
    T = args.T or (64 if args.smoke else 2_000 if args.quick else 10_000)
    reps = args.reps or (1 if args.smoke else 5)
    rows = []
    for kind in args.cells:
        for D in Ds:
            cell, s0 = make(kind, D, jax.random.key(0))
            xs = jax.random.normal(jax.random.key(1), (T, 4), jnp.float32)
            closed, lin_closed = measure(cell, xs, s0, reps, jaxpr=True)
            jaxpr, lin_jaxpr = measure(Hidden(cell), xs, s0, reps, jaxpr=True)
            autodiff, lin_autodiff = measure(HiddenJVP(cell), xs, s0, reps, jaxpr=False)
            rows.append(
                dict(
                    cell=kind,
                    D=D,
                    T=T,
                    closed_ms=1e3 * closed,
                    jaxpr_ms=1e3 * jaxpr,
                    autodiff_ms=1e3 * autodiff,
                    jaxpr_ratio=jaxpr / closed,
                    autodiff_ratio=autodiff / closed,
                    lin_closed_ms=1e3 * lin_closed,
                    lin_jaxpr_ms=1e3 * lin_jaxpr,
                    lin_autodiff_ms=1e3 * lin_autodiff,
                )
            )
            print(rows[-1], flush=True)
    print(f"\nQuasiDEER per-iteration cost, float32, backend={jax.default_backend()}")
    print(format_table(rows))
    write_csv(args.out / "bench_fallback.csv", rows)
    return rows


if __name__ == "__main__":
    main()
