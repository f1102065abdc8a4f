"""The Jacobian diagonal read off a cell's jaxpr (`parallel_rnn/_jaxpr_diagonal.py`).

Oracles: `jnp.diagonal(jax.jacfwd(...))` for the diagonal, `lax.scan` for the
solve and for its gradient.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import parallel_rnn as prnn
from parallel_rnn import _jaxpr_diagonal
from parallel_rnn._jaxpr_diagonal import is_structured, structured_value_and_diagonal
from parallel_rnn._problem import FlatCell, Problem, make_spec

from .helpers import max_abs_diff, scan_reference


D = 6
F64 = jnp.float64
_W = jax.random.normal(jax.random.key(3), (D, D), F64) / D**0.5


class MLPCell(eqx.Module):
    """The residual MLP cell of `experiments/bench_fallback.py`: `s + W₂ tanh(W₁ s + U x)`."""

    w1: jax.Array
    w2: jax.Array
    u: jax.Array

    def __init__(self, dtype=F64):
        k1, k2, k3 = jax.random.split(jax.random.key(4), 3)
        self.w1 = jax.random.normal(k1, (D, D), dtype) / D**0.5
        self.w2 = -0.5 * jax.random.normal(k2, (D, D), dtype) / D**0.5
        self.u = jax.random.normal(k3, (D, 3), dtype)

    def __call__(self, x, s):
        return s + self.w2 @ jnp.tanh(self.w1 @ s + self.u @ x)


def _gru(dtype=F64):
    return eqx.nn.GRUCell(3, D, key=jax.random.key(0), dtype=dtype)


def _lstm(dtype=F64):
    return eqx.nn.LSTMCell(3, D, key=jax.random.key(0), dtype=dtype)


def _closure(cell):
    # A plain function hides the cell's registered closed-form Jacobians.
    return lambda x, s: cell(x, s)


def _slices(x, s):
    del x
    gate = jax.nn.sigmoid(s[:3]) * jnp.tanh(s[3:])
    return jnp.concatenate([gate, jnp.tanh(_W[:3] @ s + s[0])])


def _repeated(x, s):
    # Columns 0..2 are hit twice by the selection under each matrix product.
    del x
    twice = jnp.concatenate([s[:3], s[:3]])
    return _W @ jnp.tanh(twice) + _W @ jnp.tanh(_W @ twice)


def _lorenz96(x, s):
    del x
    return prnn.cells.Lorenz96(dim=D)(jnp.zeros(D, F64), s)


_h = jnp.zeros(D, F64)
STRUCTURED = {
    "gru": (_closure(_gru()), _h),
    "lstm": (_closure(_lstm()), (_h, _h)),
    "mlp": (MLPCell(), _h),
    "sigmoid_tanh_slices_concat": (_slices, _h),
    "lorenz96_rolls_rk4": (_lorenz96, _h),
    "bilinear": (lambda x, s: s * (_W @ s), _h),
    "non_injective_selection": (_repeated, _h),
    "scalar_times_vector_pad_flip": (
        lambda x, s: s[1] * jnp.tanh(_W @ s) + jnp.flip(jnp.pad(s[1:], (0, 1))) * jnp.sum(x),
        _h,
    ),
}


@jax.custom_jvp
def _rotated_tanh(v):
    # A custom rule on a function that mixes its entries: not elementwise.
    return _W @ jnp.tanh(v)


_rotated_tanh.defjvp(lambda p, t: (_rotated_tanh(p[0]), _W @ (t[0] / jnp.cosh(p[0]) ** 2)))

FALLBACK = {
    "custom_jvp_not_elementwise": (lambda x, s: _rotated_tanh(s), _h),
    "dot_s_s": (lambda x, s: jnp.dot(s, s) * s, _h),
    "norm": (lambda x, s: jnp.linalg.norm(s) * s, _h),
    "sort": (lambda x, s: jnp.sort(s), _h),
    "three_matrix_levels": (lambda x, s: _W @ jnp.tanh(_W @ jnp.tanh(_W @ s)), _h),
    "seventeen_matrix_terms": (lambda x, s: sum(jnp.tanh(k * (_W @ s)) for k in range(1, 18)), _h),
}


def _flat(cell, state):
    return FlatCell(cell, None, make_spec(state))


def _point(fn: FlatCell, dtype=F64):
    x = jax.random.normal(jax.random.key(1), (3,), dtype)
    s = jax.random.normal(jax.random.key(2), (fn.spec.size,), dtype)
    return x, s


def _jacfwd_diagonal(fn, x, s):
    return jnp.diagonal(jax.jacfwd(lambda s_: fn(x, s_))(s))


@pytest.mark.parametrize("name", sorted(STRUCTURED))
def test_structured_diagonal_and_value_match_jacfwd_float64(name):
    fn = _flat(*STRUCTURED[name])
    x, s = _point(fn)
    value_and_diag = structured_value_and_diagonal(fn, x, s)
    assert value_and_diag is not None, "the structured analysis should succeed"

    @jax.jit  # one compilation instead of one per primitive
    def errors(x, s):
        value, diag = value_and_diag(x, s)
        return (
            jnp.max(jnp.abs(diag - _jacfwd_diagonal(fn, x, s))),
            jnp.max(jnp.abs(value - fn(x, s))),
        )

    diag_error, value_error = errors(x, s)
    assert diag_error < 1e-12 and value_error < 1e-12


@pytest.mark.parametrize("name", sorted(FALLBACK))
def test_unsupported_cells_fall_back_and_problem_diagonal_stays_exact(name):
    fn = _flat(*FALLBACK[name])
    x, s = _point(fn)
    assert not is_structured(fn, x, s)
    problem = Problem(fn, x[None], s)
    diag = problem.diagonal_at(s[None])[0]
    assert max_abs_diff(diag, _jacfwd_diagonal(fn, x, s)) < 1e-12


def test_problem_linearise_diagonal_uses_structured_path_over_time_and_matches_jacfwd():
    fn = _flat(*STRUCTURED["lstm"])  # pytree state: ravelled (h, c), slices and concat
    T = 5
    xs = jax.random.normal(jax.random.key(5), (T, 3), F64)
    prev = jax.random.normal(jax.random.key(6), (T, fn.spec.size), F64)
    problem = Problem(fn, xs, prev[0])
    assert problem._structured_diagonal() is not None
    fs, diag = eqx.filter_jit(lambda p, st: p.linearise_diagonal(st))(problem, prev)
    # linearise_diagonal evaluates at the shifted trajectory (prev[0], prev[0..T-2]).
    shifted = jnp.concatenate([prev[:1], prev[:-1]])
    expected = jax.vmap(lambda x, s: _jacfwd_diagonal(fn, x, s))(xs, shifted)
    assert max_abs_diff(diag, expected) < 1e-12
    assert max_abs_diff(fs, jax.vmap(fn)(xs, shifted)) < 1e-12


def test_structured_diagonal_with_weights_traced_under_grad():
    # Under grad the weights reach the jaxpr as constants that are tracers (under
    # jit too: the solves below pass the closure-converted weights as jit inputs).
    x, s = _point(_flat(MLPCell(), _h))

    def diag_sum(cell):
        fn = _flat(cell, _h)
        value_and_diag = structured_value_and_diagonal(fn, x, s)
        assert value_and_diag is not None
        return jnp.sum(value_and_diag(x, s)[1])

    def reference(cell):
        return jnp.sum(_jacfwd_diagonal(_flat(cell, _h), x, s))

    cell = MLPCell()
    assert abs(diag_sum(cell) - reference(cell)) < 1e-12
    grads = eqx.filter_grad(diag_sum)(cell)
    assert max_abs_diff(grads, eqx.filter_grad(reference)(cell)) < 1e-12


def test_opt_out_switch_restores_autodiff_fallback(monkeypatch):
    fn = _flat(*STRUCTURED["gru"])
    x, s = _point(fn)
    monkeypatch.setattr(_jaxpr_diagonal, "ENABLED", False)
    assert not is_structured(fn, x, s)
    assert Problem(fn, x[None], s)._structured_diagonal() is None


@pytest.mark.parametrize("name, dtype, tol", [("gru", jnp.float32, 1e-4), ("lstm", F64, 1e-10)])
def test_quasideer_on_closure_matches_sequential_under_jit_and_vmap(name, dtype, tol):
    cell = _gru(dtype) if name == "gru" else _lstm(dtype)
    fn = _closure(cell)
    h = jnp.zeros(D, dtype)
    s0 = h if name == "gru" else (h, h)
    B, T = 2, 30
    xs = jax.random.normal(jax.random.key(7), (B, T, 3), dtype)

    @jax.jit
    @jax.vmap
    def solve(x):
        return prnn.solve_parallel(fn, x, s0, prnn.QuasiDEER()).states

    expected = jax.vmap(lambda x: prnn.solve_sequential(fn, x, s0))(xs)
    assert max_abs_diff(solve(xs), expected) < tol


def test_grad_through_quasideer_on_closure_matches_bptt():
    cell = MLPCell()
    T = 20
    xs = jax.random.normal(jax.random.key(9), (T, 3), F64)

    def loss(solve, args):
        cell, xs = args
        fn = lambda x, s: cell(x, s)  # noqa: E731
        return jnp.sum(jnp.sin(solve(fn, xs, _h)))

    parallel = lambda f, x, s: prnn.solve_parallel(f, x, s, prnn.QuasiDEER()).states  # noqa: E731
    actual = eqx.filter_jit(eqx.filter_grad(lambda a: loss(parallel, a)))((cell, xs))
    expected = eqx.filter_grad(lambda a: loss(scan_reference, a))((cell, xs))
    assert max_abs_diff(actual, expected) < 1e-8
    assert np.max(np.abs(actual[0].w1)) > 0


# --- issue 23: derivatives that are not the primal's derivative everywhere --------

_W6 = 0.25 * jax.random.normal(jax.random.key(23), (D, D), F64)


@jax.custom_jvp
def _safe_sqrt(u):
    return jnp.sqrt(jnp.maximum(u, 0.0))


@_safe_sqrt.defjvp
def _safe_sqrt_jvp(primals, tangents):
    (u,), (du,) = primals, tangents
    y = _safe_sqrt(u)
    return y, jnp.where(u > 0, du / (2 * jnp.maximum(y, 1e-6)), 0.0)


@jax.custom_vjp
def _clipped_tanh(u):
    return jnp.tanh(u)


def _clipped_tanh_fwd(u):
    return jnp.tanh(u), u


def _clipped_tanh_bwd(u, g):
    return (jnp.where(jnp.abs(u) < 1, g, 0.0),)  # a straight-through VJP, not tanh'


_clipped_tanh.defvjp(_clipped_tanh_fwd, _clipped_tanh_bwd)

# x_t has D entries here, as in the reproducers.
RULE_CELLS = {
    # The unselected branch's derivative is NaN at s = 0 (0/0).
    "where_sinc": lambda x, s: (
        0.6 * jnp.where(s != 0, jnp.sin(s) / s, 1.0) * jnp.tanh(_W6 @ s + x) + 0.1 * s
    ),
    # The primal's derivative is inf/NaN for u <= 0, the rule's is 0.
    "custom_jvp_safe_sqrt": lambda x, s: 0.5 * _safe_sqrt(jnp.tanh(_W6 @ s + x)) + 0.2 * s,
    # A primitive with several results.
    "optimization_barrier": lambda x, s: (lambda a, b: jnp.tanh(_W6 @ a + b))(
        *jax.lax.optimization_barrier((s, x))
    ),
    # Reverse mode only: the oracle is jacrev, and the VJP rule is not tanh'.
    "custom_vjp_clipped_tanh": lambda x, s: _clipped_tanh(_W6 @ s + 2 * x) + 0.1 * s,
}


@pytest.mark.parametrize("name", sorted(RULE_CELLS))
def test_structured_diagonal_follows_derivative_rules_and_is_finite_where_autodiff_is(name):
    cell = RULE_CELLS[name]
    fn = _flat(cell, _h)
    x = jax.random.normal(jax.random.key(24), (D,), F64)
    value_and_diag = structured_value_and_diagonal(fn, x, _h)
    assert value_and_diag is not None, "the structured analysis should succeed"
    oracle = jax.jacrev if name.startswith("custom_vjp") else jax.jacfwd
    for s in (_h, jax.random.normal(jax.random.key(25), (D,), F64)):
        expected = jnp.diagonal(oracle(lambda s_: fn(x, s_))(s))
        assert bool(jnp.all(jnp.isfinite(expected)))
        value, diag = jax.jit(value_and_diag)(x, s)
        assert max_abs_diff(diag, expected) < 1e-12
        assert max_abs_diff(value, fn(x, s)) < 1e-12


def test_selection_above_a_matrix_product_keeps_unselected_rows_empty():
    # At s = 0 the derivative of sqrt(s²) is 0·inf = NaN, which W spreads to every
    # row of W @ sqrt(s²); jnp.where keeps it only in the rows it selects.
    x = jnp.array([1.0, -1.0, 1.0, -1.0, -1.0, 1.0], F64)

    def cell(x, s):
        return jnp.where(x > 0, jnp.tanh(_W6 @ jnp.sqrt(s**2) + x), 0.3 * jnp.tanh(s))

    fn = _flat(cell, _h)
    value_and_diag = structured_value_and_diagonal(fn, x, _h)
    assert value_and_diag is not None
    expected = jnp.diagonal(jax.jacfwd(lambda s_: fn(x, s_))(_h))
    diag = jax.jit(value_and_diag)(x, _h)[1]
    finite = np.asarray(jnp.isfinite(expected))
    assert finite.tolist() == (np.asarray(x) < 0).tolist()
    assert max_abs_diff(diag[finite], expected[finite]) < 1e-15


def test_an_error_inside_the_analysis_falls_back_to_jvps(monkeypatch):
    def broken(eqn, ins, in_jacs):
        raise RuntimeError("an analysis bug")

    monkeypatch.setattr(_jaxpr_diagonal, "_rule", broken)
    fn = _flat(*STRUCTURED["gru"])
    x, s = _point(fn)
    assert not is_structured(fn, x, s)
    diag = Problem(fn, x[None], s).diagonal_at(s[None])[0]
    assert max_abs_diff(diag, _jacfwd_diagonal(fn, x, s)) < 1e-12


_T_RULE = 120
_XS_RULE = jax.random.normal(jax.random.key(26), (_T_RULE, D), F64)


@pytest.mark.parametrize(
    "name, solver, max_steps",
    [
        # All 120 iterations (NaN diagonals) before; 23 with the true diagonal (the
        # same count as with the D-JVP diagonal, measured).
        ("where_sinc", prnn.QuasiDEER(), 25),
        ("where_sinc", prnn.QuasiELK(), 25),
        # 120 with the primal's derivative; 15 with the rule's (and with D JVPs).
        ("custom_jvp_safe_sqrt", prnn.QuasiDEER(), 20),
        # These crashed.
        ("optimization_barrier", prnn.QuasiDEER(), _T_RULE),
        ("optimization_barrier", prnn.QuasiELK(), _T_RULE),
    ],
)
def test_quasi_solvers_on_rule_cells_match_scan_in_few_iterations(name, solver, max_steps):
    cell = RULE_CELLS[name]
    sol = prnn.solve_parallel(cell, _XS_RULE, _h, solver)
    assert max_abs_diff(sol.states, scan_reference(cell, _XS_RULE, _h)) < 1e-9
    assert int(sol.num_steps) <= max_steps


def test_picard_gradient_through_optimization_barrier_cell_matches_scan():
    base = RULE_CELLS["optimization_barrier"]
    xs = _XS_RULE[:30]

    def loss(solve, scale):
        cell = lambda x, s: base(x, scale * s)  # noqa: E731
        return jnp.sum(jnp.sin(solve(cell, xs, _h)))

    picard = lambda c, x, s: prnn.solve_parallel(c, x, s, prnn.Picard()).states  # noqa: E731
    actual = jax.grad(lambda a: loss(picard, a))(1.3)
    expected = jax.grad(lambda a: loss(scan_reference, a))(1.3)
    assert abs(actual - expected) < 1e-9 and abs(expected) > 1e-3
