"""Property-based checks (hypothesis) of `solve_parallel`'s promises on random problems.

Random cells (GRU, LSTM with a tuple state, a closure Elman cell), random weight
scales from contractive to unstable (`tanh` keeps them bounded), random sizes,
dtypes, solvers and tolerances. For every draw:

- the returned states are finite, `num_steps <= T` with `max_steps = T`;
- `converged` holds exactly when the residual recomputed here with `jax.vmap(cell)`
  meets the tolerance (up to the last-ulp slack of two compilations of one formula),
  and `result` says `successful` exactly then;
- in float64, when converged, gradients match backpropagation through `lax.scan`.

The draws come from a fixed, derandomised profile with a bounded number of
examples, and the shapes from short lists, so that compiled functions are shared
between examples and the module stays within its CI time budget.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from hypothesis import HealthCheck, given, settings, strategies as st

import parallel_rnn as prnn

from .helpers import scan_reference


PROFILE = settings(
    max_examples=6,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
M = 2
SOLVERS = [prnn.QuasiDEER(), prnn.DEER(), prnn.QuasiELK(), prnn.ELK(), prnn.Picard(), prnn.Jacobi()]
LENGTHS = [1, 37, 300]
SIZES = [1, 5, 12]


class _Elman(eqx.Module):
    W: jax.Array
    U: jax.Array
    b: jax.Array


def _make(kind: str, D: int, dtype, scale: float, seed: int):
    """`(params, build, init_state)`: `build(params)` is the cell (a closure for "elman")."""
    key = jax.random.key(seed)
    if kind == "elman":
        kw, ku, kb = jax.random.split(key, 3)
        params = _Elman(
            scale * jax.random.normal(kw, (D, D), dtype) / D**0.5,
            jax.random.normal(ku, (D, M), dtype),
            0.1 * jax.random.normal(kb, (D,), dtype),
        )

        return params, _elman_cell, jnp.zeros(D, dtype)
    cls = eqx.nn.GRUCell if kind == "gru" else eqx.nn.LSTMCell
    cell = cls(M, D, dtype=dtype, key=key)
    cell = eqx.tree_at(lambda c: c.weight_hh, cell, scale * cell.weight_hh)
    h0 = jnp.zeros(D, dtype) if kind == "gru" else (jnp.zeros(D, dtype), jnp.zeros(D, dtype))
    return cell, _identity, h0


# Module-level, so that `eqx.filter_jit` sees the same static `build` every time.
def _elman_cell(p: _Elman):
    return lambda x, s: jnp.tanh(p.W @ s + p.U @ x + p.b)


def _identity(cell):
    return cell


def _residual_ok(cell, xs, h0, states, rtol, atol, slack):
    prev = jax.tree_util.tree_map(lambda s0, s: jnp.concatenate([s0[None], s[:-1]]), h0, states)
    fs = jax.vmap(cell)(xs, prev)
    oks = jax.tree_util.tree_map(
        lambda s, f: jnp.all(jnp.abs(s - f) <= slack * (atol + rtol * jnp.abs(s))), states, fs
    )
    return jnp.all(jnp.stack(jax.tree_util.tree_leaves(oks)))


@eqx.filter_jit
def _solve_and_check(params, build, xs, h0, solver, rtol, atol):
    cell = build(params)
    T = xs.shape[0]
    sol = prnn.solve_parallel(cell, xs, h0, solver, rtol=rtol, atol=atol, max_steps=T, throw=False)
    dtype = jax.tree_util.tree_leaves(h0)[0].dtype
    default_rtol, default_atol = (1e-10, 1e-10) if dtype == jnp.float64 else (1e-5, 1e-5)
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    loose = _residual_ok(cell, xs, h0, sol.states, rtol, atol, 1 + 1e-3)
    tight = _residual_ok(cell, xs, h0, sol.states, rtol, atol, 1 - 1e-3)
    finite = jnp.all(
        jnp.stack([jnp.all(jnp.isfinite(s)) for s in jax.tree_util.tree_leaves(sol.states)])
    )
    return sol.converged, sol.result == prnn.RESULTS.successful, sol.num_steps, loose, tight, finite


problems = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(["gru", "lstm", "elman"]),
        "T": st.sampled_from(LENGTHS),
        "D": st.sampled_from(SIZES),
        "float64": st.booleans(),
        "solver": st.sampled_from(SOLVERS),
        "scale": st.floats(0.1, 3.0),
        "input_scale": st.floats(0.0, 3.0),
        "seed": st.integers(0, 2**16),
        "tol": st.sampled_from([None, 1e-4]),
    }
)


@PROFILE
@given(problems)
def test_converged_iff_the_cells_own_residual_meets_the_tolerance(p):
    dtype = jnp.float64 if p["float64"] else jnp.float32
    params, build, h0 = _make(p["kind"], p["D"], dtype, p["scale"], p["seed"])
    xs = p["input_scale"] * jax.random.normal(jax.random.key(p["seed"] + 1), (p["T"], M), dtype)
    tol = p["tol"]
    converged, successful, steps, loose, tight, finite = _solve_and_check(
        params, build, xs, h0, p["solver"], tol, tol
    )
    assert bool(finite)
    assert int(steps) <= p["T"]
    assert bool(converged) == bool(successful)
    if bool(converged):
        assert bool(loose)
    else:
        assert not bool(tight)


@eqx.filter_jit
def _gradients(params, build, xs, h0, solver):
    def loss(args, evaluate):
        params, xs, h0 = args
        states = evaluate(build(params), xs, h0)
        return sum(jnp.sum(jnp.sin(s)) for s in jax.tree_util.tree_leaves(states))

    def parallel(cell, xs, h0):
        return prnn.solve_parallel(cell, xs, h0, solver, throw=False).states

    sol = prnn.solve_parallel(build(params), xs, h0, solver, throw=False)
    g_par = eqx.filter_grad(loss)((params, xs, h0), parallel)
    g_seq = eqx.filter_grad(loss)((params, xs, h0), scan_reference)
    return sol.converged, g_par, g_seq


@settings(PROFILE, max_examples=4)
@given(problems.filter(lambda p: p["T"] < 300 and p["scale"] < 1.5))
def test_gradients_match_backpropagation_through_scan_when_converged(p):
    params, build, h0 = _make(p["kind"], p["D"], jnp.float64, p["scale"], p["seed"])
    xs = p["input_scale"] * jax.random.normal(jax.random.key(p["seed"] + 1), (p["T"], M))
    converged, g_par, g_seq = _gradients(params, build, xs, h0, p["solver"])
    if not bool(converged):
        return
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(g_seq))
    for a, b in zip(jax.tree_util.tree_leaves(g_par), jax.tree_util.tree_leaves(g_seq)):
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-6 * max(scale, 1.0)
