"""Bad input is refused at trace time; failures at run time are reported honestly."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import parallel_rnn as prnn


T, D = 20, 4
CELL = eqx.nn.GRUCell(2, D, key=jax.random.key(0))
XS = jax.random.normal(jax.random.key(1), (T, 2))
H0 = jnp.zeros(D)


def test_leaves_with_different_lengths_are_refused():
    xs = {"a": jnp.ones((T, 2)), "b": jnp.ones((T + 1, 1))}
    with pytest.raises(ValueError, match=r"inputs.*\(20, 2\).*\(21, 1\)"):
        prnn.solve_parallel(lambda x, s: s * x["b"], xs, H0)


def test_empty_sequence_is_refused():
    with pytest.raises(ValueError, match=r"T == 0"):
        prnn.solve_parallel(CELL, jnp.ones((0, 2)), H0)


def test_scalar_input_leaf_is_refused():
    with pytest.raises(ValueError, match="leading time axis"):
        prnn.solve_parallel(lambda x, s: s, jnp.float64(1.0), H0)


def test_cell_changing_structure_is_refused():
    with pytest.raises(ValueError, match="structure"):
        prnn.solve_parallel(lambda x, s: (s, s), XS, H0)


def test_cell_changing_shape_is_refused():
    with pytest.raises(ValueError, match=r"shapes.*\(4,\).*\(5,\)"):
        prnn.solve_parallel(lambda x, s: jnp.concatenate([s, s[:1]]), XS, H0)


def test_cell_changing_dtype_is_refused():
    with pytest.raises(TypeError, match="dtype"):
        prnn.solve_parallel(lambda x, s: s.astype(jnp.float32), XS, H0)


def test_integer_state_is_refused():
    with pytest.raises(TypeError, match="init_state.*floating"):
        prnn.solve_parallel(lambda x, s: s, XS, jnp.zeros(D, jnp.int32))


def test_mixed_state_dtypes_are_refused():
    with pytest.raises(TypeError, match="one dtype"):
        prnn.solve_parallel(lambda x, s: s, XS, (jnp.zeros(2), jnp.zeros(2, jnp.float32)))


def test_guess_of_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"guess.*\(20, 4\)"):
        prnn.solve_parallel(CELL, XS, H0, guess=jnp.zeros((T - 1, D)))


def test_guess_of_wrong_structure_is_refused():
    with pytest.raises(ValueError, match="guess.*structure"):
        prnn.solve_parallel(CELL, XS, H0, guess=(jnp.zeros((T, D)),))


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="rtol"):
        prnn.solve_parallel(CELL, XS, H0, rtol=-1.0)
    with pytest.raises(ValueError, match="max_steps"):
        prnn.solve_parallel(CELL, XS, H0, max_steps=0)
    with pytest.raises(TypeError, match="solver"):
        prnn.solve_parallel(CELL, XS, H0, "DEER")


def test_nan_input_gives_not_converged_and_finite_states():
    xs = XS.at[T // 2, 0].set(jnp.nan)
    sol = prnn.solve_parallel(CELL, xs, H0, prnn.DEER(), throw=False)
    assert not bool(sol.converged)
    assert bool(jnp.all(jnp.isfinite(sol.states)))
    # The prefix before the NaN is still the right answer.
    ref = prnn.solve_sequential(CELL, xs, H0)
    assert float(jnp.max(jnp.abs(sol.states[: T // 2] - ref[: T // 2]))) < 1e-6


def test_nan_input_raises_with_throw():
    xs = XS.at[T // 2, 0].set(jnp.nan)
    with pytest.raises(eqx.EquinoxRuntimeError, match="did not converge: no progress possible"):
        jax.block_until_ready(prnn.solve_parallel(CELL, xs, H0, prnn.DEER()).states)


def test_max_steps_too_small_is_reported_not_hidden():
    sol = prnn.solve_parallel(CELL, XS, H0, prnn.Jacobi(), max_steps=2, throw=False)
    assert int(sol.num_steps) == 2 and not bool(sol.converged)
    assert float(sol.residual) > 1e-3
    with pytest.raises(eqx.EquinoxRuntimeError):
        jax.block_until_ready(prnn.solve_parallel(CELL, XS, H0, prnn.Jacobi(), max_steps=2).states)


def test_overflowing_cell_never_leaks_non_finite_states():
    # The true trajectory overflows to inf after a few steps: honest failure, finite output.
    sol = prnn.solve_parallel(lambda x, s: s * 1e30 + 1.0, XS, H0, prnn.DEER(), throw=False)
    assert not bool(sol.converged)
    assert bool(jnp.all(jnp.isfinite(sol.states)))


class _WrongJacobianCell(eqx.Module):
    def __call__(self, x, s):
        return jnp.tanh(s + x)

    def value_and_jacobian(self, x, s):
        return self(x, s), jnp.zeros((3, 3))  # D is 2


def test_value_and_jacobian_of_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"value_and_jacobian.*\(2, 2\)"):
        prnn.solve_parallel(_WrongJacobianCell(), jnp.zeros((4, 2)), jnp.zeros(2), prnn.DEER())
