"""Sharded-vs-unsharded checks, run in a subprocess with 8 forced CPU devices.

`python -m tests.sharding_checks` (with `XLA_FLAGS=--xla_force_host_platform_device_count=8`)
prints one JSON object `{check name: [passed, detail]}`; `test_sharding.py` runs it
once and asserts on every entry. The device count is fixed when JAX starts, which
is why this cannot run inside the main pytest process.
"""

import json
import os
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

import parallel_rnn as prnn  # noqa: E402


T, D, N_IN = 24, 3, 2
TOL = 1e-10


class TanhCell(eqx.Module):
    W: jax.Array
    U: jax.Array
    b: jax.Array

    def __call__(self, x, s):
        return jnp.tanh(self.W @ s + self.U @ x + self.b)


def make_problem(dtype=jnp.float64, batch=None):
    k = jax.random.split(jax.random.key(0), 6)
    # Gain 1.6: expansive enough that DEER needs several iterations and the
    # frontier of the damped and zeroth-order solvers crosses every shard boundary.
    cell = TanhCell(
        1.6 * jax.random.normal(k[0], (D, D), dtype) / D**0.5,
        jax.random.normal(k[1], (D, N_IN), dtype),
        0.1 * jax.random.normal(k[2], (D,), dtype),
    )
    lead = () if batch is None else (batch,)
    xs = jax.random.normal(k[3], (*lead, T, N_IN), dtype)
    s0 = 0.5 * jax.random.normal(k[4], (*lead, D), dtype)
    weights = jax.random.normal(k[5], (*lead, T, D), dtype)
    return cell, xs, s0, weights


def max_diff(a, b) -> float:
    leaves = jax.tree_util.tree_leaves(
        jax.tree_util.tree_map(lambda x, y: jnp.max(jnp.abs(x - y)), a, b)
    )
    return float(max(leaves))


def flat(states):
    """A trajectory pytree (an LSTM's `(h, c)`) as one `(..., T, D)` array."""
    return jnp.concatenate(jax.tree_util.tree_leaves(states), axis=-1)


def value_and_grad(solve):
    """One compiled function: trajectory, iteration count and gradient of a weighted sum."""

    def loss(args, weights):
        cell, xs, s0 = args
        sol = solve(cell, xs, s0)
        return jnp.sum(flat(sol.states) * weights), (sol.states, sol.num_steps)

    return eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))


def forward(solve):
    """`value_and_grad`'s signature, without the gradient (half the compile time)."""

    def run(args, weights):
        sol = solve(*args)
        return (jnp.sum(flat(sol.states) * weights), (sol.states, sol.num_steps)), None

    return eqx.filter_jit(run)


def make_lstm(T_=T):
    """`eqx.nn.LSTMCell` (tuple state, closed-form gated Jacobian), hidden size 2: D = 4."""
    k = jax.random.split(jax.random.key(1), 4)
    cell = eqx.nn.LSTMCell(N_IN, 2, key=k[0], dtype=jnp.float64)
    # Scaled up so that the solves take several iterations.
    cell = eqx.tree_at(lambda c: c.weight_hh, cell, 3 * cell.weight_hh)
    xs = jax.random.normal(k[1], (T_, N_IN), jnp.float64)
    s0 = (0.3 * jax.random.normal(k[2], (2,)), jnp.zeros((2,)))
    weights = jax.random.normal(k[3], (T_, 4), jnp.float64)
    return cell, xs, s0, weights


def mesh_of(n, names=("t",), shape=None):
    devices = np.array(jax.devices()[:n])
    return Mesh(devices.reshape(shape or (n,)), names)


def main() -> None:
    results: dict[str, list] = {}

    def record(name, ok, detail):
        results[name] = [bool(ok), detail]

    solvers = {
        "DEER": prnn.DEER(),
        "QuasiDEER": prnn.QuasiDEER(),
        "ELK": prnn.ELK(),
        "QuasiELK": prnn.QuasiELK(),
        "Picard": prnn.Picard(),
        "Jacobi": prnn.Jacobi(),
        # the other evaluation orders and the adaptive LM smoother, on one mesh
        # (gradients only where the variant changes the adjoint: its scan order)
        "DEER-associative": prnn.DEER(scan="associative"),
        "ELK-adaptive-smoother": prnn.ELK(adaptive=True, posterior="smoother"),
        "QuasiELK-adaptive-smoother-associative": prnn.QuasiELK(
            adaptive=True, posterior="smoother", scan="associative"
        ),
    }
    forward_only = ("ELK-adaptive-smoother", "QuasiELK-adaptive-smoother-associative")
    cell, xs, s0, weights = make_problem()
    for name, solver in solvers.items():
        # The base solvers at the extreme device counts: one interior shard boundary
        # (P = 2), and 3-step shards with every boundary crossed (P = 8); P = 4 is
        # every variant's mesh and that of the jvp, guess and float32 checks below.
        counts = (2, 8) if "-" not in name else (4,)
        compiled = forward if name in forward_only else value_and_grad
        ref = compiled(lambda c, x, s: prnn.solve_parallel(c, x, s, solver))
        (_, (states_ref, n_ref)), g_ref = ref((cell, xs, s0), weights)
        for n in counts:
            mesh = mesh_of(n)
            run = compiled(
                lambda c, x, s: prnn.solve_sharded(c, x, s, solver, mesh=mesh, axis_name="t")
            )
            (_, (states, steps)), g = run((cell, xs, s0), weights)
            ds = max_diff(states, states_ref)
            dg = 0.0 if g is None else max_diff(g, g_ref)
            detail = f"|Δs|={ds:.1e} |Δgrad|={dg:.1e} steps {int(steps)} vs {int(n_ref)}"
            record(f"{name}/P={n}/states", ds <= TOL, detail)
            record(f"{name}/P={n}/iterations", int(steps) == int(n_ref), detail)
            if g is not None:
                record(f"{name}/P={n}/gradients", dg <= TOL, detail)

    # T not divisible by the number of shards: a ValueError naming the sizes.
    try:
        prnn.solve_sharded(cell, xs[:20], s0, mesh=mesh_of(8), axis_name="t")
        record("indivisible-T/error", False, "no error raised")
    except ValueError as e:
        msg = str(e)
        record("indivisible-T/error", "T = 20" in msg and "8" in msg, msg[:200])

    # Batch and sequence sharding together on a 2x4 mesh, per sequence equal to
    # the unsharded solve of that sequence.
    B = 4
    cell_b, xs_b, s0_b, w_b = make_problem(batch=B)
    mesh = mesh_of(8, ("b", "t"), (2, 4))
    xs_b = jax.device_put(xs_b, NamedSharding(mesh, P("b", "t")))
    for name in ("QuasiDEER", "ELK"):
        solver = solvers[name]
        # ELK's batch check is forward only: the gradient path is QuasiDEER's.
        compiled = value_and_grad if name == "QuasiDEER" else forward
        run = compiled(
            lambda c, x, s: prnn.solve_sharded(
                c, x, s, solver, mesh=mesh, axis_name="t", batch_axis="b"
            )
        )
        (_, (states, steps)), g = run((cell_b, xs_b, s0_b), w_b)
        ref = compiled(
            lambda c, x, s: jax.vmap(lambda x_, s_: prnn.solve_parallel(c, x_, s_, solver))(x, s)
        )
        (_, (states_ref, n_ref)), g_ref = ref((cell_b, xs_b, s0_b), w_b)
        ds = max_diff(states, states_ref)
        dg = 0.0 if g is None else max_diff(g, g_ref)
        same_steps = bool(jnp.all(steps == n_ref))
        detail = f"|Δs|={ds:.1e} |Δgrad|={dg:.1e} steps {steps.tolist()} vs {n_ref.tolist()}"
        record(f"batch+sequence-2x4/{name}", ds <= TOL and dg <= TOL and same_steps, detail)

    # The batch-sharding recipe: jit(vmap(solve_parallel)) on batch-sharded inputs.
    B = 8
    cell_b, xs_b, s0_b, _ = make_problem(batch=B)
    mesh = mesh_of(8, ("b",))
    xs_s = jax.device_put(xs_b, NamedSharding(mesh, P("b")))
    s0_s = jax.device_put(s0_b, NamedSharding(mesh, P("b")))
    batched = eqx.filter_jit(jax.vmap(lambda x, s: prnn.solve_parallel(cell_b, x, s).states))
    out = batched(xs_s, s0_s)
    ref = jnp.stack([prnn.solve_parallel(cell_b, xs_b[i], s0_b[i]).states for i in range(B)])
    spread = len(out.sharding.device_set)
    record(
        "batch-recipe",
        max_diff(out, ref) <= TOL and spread == 8,
        f"|Δs|={max_diff(out, ref):.1e}, output on {spread} devices",
    )

    # An LSTM (tuple state, closed-form gated Jacobian) on time-sharded inputs:
    # DEER with gradients, and BlockQuasiDEER's block recurrence composed over the
    # shards (the same iterates, so the same iteration count).
    lstm, xs_l, s0_l, w_l = make_lstm()
    mesh = mesh_of(8)
    xs_ls = jax.device_put(xs_l, NamedSharding(mesh, P("t")))
    for name, solver, compiled in (
        ("DEER", prnn.DEER(), value_and_grad),
        ("BlockQuasiDEER", prnn.BlockQuasiDEER(), forward),
    ):
        run = compiled(
            lambda c, x, s: prnn.solve_sharded(c, x, s, solver, mesh=mesh, axis_name="t")
        )
        ref = compiled(lambda c, x, s: prnn.solve_parallel(c, x, s, solver))
        (_, (states, steps)), g = run((lstm, xs_ls, s0_l), w_l)
        (_, (states_ref, n_ref)), g_ref = ref((lstm, xs_l, s0_l), w_l)
        ds = max_diff(states, states_ref)
        dg = 0.0 if g is None else max_diff(g, g_ref)
        detail = f"|Δs|={ds:.1e} |Δgrad|={dg:.1e} steps {int(steps)} vs {int(n_ref)}"
        record(f"lstm/{name}/P=8/states", ds <= TOL, detail)
        record(f"lstm/{name}/P=8/iterations", int(steps) == int(n_ref) > 2, detail)
        if g is not None:
            record(f"lstm/{name}/P=8/gradients", dg <= TOL, detail)

    # Forward mode: jax.jvp through solve_sharded against jax.jvp through lax.scan,
    # in the cell's parameters, the inputs and s_0 at once.
    mesh = mesh_of(4)
    tangents = jax.tree_util.tree_map(
        lambda x: jax.random.normal(jax.random.key(7), x.shape, x.dtype), (cell, xs, s0)
    )

    @eqx.filter_jit
    def jvp_of(solve, primals, tangents):
        return jax.jvp(lambda c, x, s: solve(c, x, s), primals, tangents)[1]

    sharded = lambda c, x, s: (
        prnn.solve_sharded(c, x, s, prnn.QuasiDEER(), mesh=mesh, axis_name="t").states
    )
    d_sharded = jvp_of(sharded, (cell, xs, s0), tangents)
    d_scan = jvp_of(prnn.solve_sequential, (cell, xs, s0), tangents)
    d = max_diff(d_sharded, d_scan)
    record("jvp/QuasiDEER/P=4", d <= 1e-8, f"|Δ tangent| vs lax.scan = {d:.1e}")

    # A guess with NaN and inf rows: replaced as in solve_parallel, finite states.
    guess = jnp.broadcast_to(s0, (T, D)).at[3].set(jnp.nan).at[T - 2].set(jnp.inf)
    kw = dict(guess=guess, max_steps=2, throw=False)  # stopped early: the guess shows
    sol = prnn.solve_sharded(cell, xs, s0, prnn.QuasiDEER(), mesh=mesh, axis_name="t", **kw)
    ref = prnn.solve_parallel(cell, xs, s0, prnn.QuasiDEER(), **kw)
    d = max_diff(sol.states, ref.states)
    finite = bool(jnp.all(jnp.isfinite(sol.states)))
    record("nonfinite-guess/P=4", finite and d <= TOL, f"finite={finite} |Δs|={d:.1e}")

    # float32: the same iterates up to float32 round-off.
    cell32, xs32, s032, _ = make_problem(jnp.float32)
    ref = prnn.solve_parallel(cell32, xs32, s032, prnn.QuasiDEER())
    sol = prnn.solve_sharded(cell32, xs32, s032, prnn.QuasiDEER(), mesh=mesh_of(4), axis_name="t")
    d = max_diff(sol.states, ref.states)
    record(
        "float32/QuasiDEER/P=4",
        d <= 1e-5 and sol.states.dtype == jnp.float32,
        f"|Δs|={d:.1e} steps {int(sol.num_steps)} vs {int(ref.num_steps)}",
    )
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    assert jax.device_count() >= 8, (jax.device_count(), os.environ.get("XLA_FLAGS"))
    main()
