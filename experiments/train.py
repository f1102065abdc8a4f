"""Training through solve_parallel: BPTT vs QuasiDEER and DEER with exact (IFT) gradients.

    python -m experiments.train [--quick] [--out results] [--dtype float64] [--solvers BPTT DEER]

A GRU (`parallel_rnn.cells.GRU`, with closed-form Jacobians)
with a linear readout learns the leaky integral of a noisy input,
`y_t = a y_{t-1} + sqrt(1 - a²) x_t`, `x_t ~ N(0, 1)`, `a = 0.9` (`--decay`),
from the whole sequence (MSE over every time step). It is trained three ways
from the same initialisation on the same fixed batch of sequences, with Adam
(cosine-decayed learning rate, gradients clipped to norm 1):

- **BPTT**: autodiff through `prnn.solve_sequential` (a `lax.scan`);
- **QuasiDEER** and **DEER**: `prnn.solve_parallel` forward, exact adjoint backward.

Each parallel solve is warm-started from the previous step's states (`guess=`,
carried by the training loop, one trajectory per sequence under `vmap`). Because
the parallel solves return the exact trajectory (to tolerance) and the exact
gradient of it, the three loss curves must agree; the study prints their largest
relative difference, the forward iterations per step (max over the batch) and the
time per step (median after compilation), and writes `train.csv` and `train.png`.

float32 by default (`--dtype float64` for double precision). Full mode: T=4096,
300 steps; `--quick`: T=512, 30 steps (a minute or two on a 2-core CPU).
"""

import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import parallel_rnn as prnn

from ._common import (
    by_mode,
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


METHODS = ("BPTT", "QuasiDEER", "DEER")


class Model(eqx.Module):
    cell: eqx.Module
    readout: eqx.nn.Linear

    def __init__(self, hidden: int, dtype, *, key):
        kc, kr = jax.random.split(key)
        # The library's GRU has an analytic Jacobian diagonal, which makes the
        # quasi solvers O(T·D); Equinox's own cell works too (autodiff diagonal).
        self.cell = prnn.cells.GRU(1, hidden, key=kc, dtype=dtype)
        self.readout = eqx.nn.Linear(hidden, 1, key=kr, dtype=dtype)


def make_data(key, batch: int, T: int, decay: float, dtype):
    """Inputs `(batch, T, 1)` and targets `(batch, T)`: a unit-variance leaky integral."""
    xs = jax.random.normal(key, (batch, T, 1), dtype)

    def step(y, x):
        y = (decay * y + np.sqrt(1 - decay**2) * x[..., 0]).astype(y.dtype)
        return y, y

    _, ys = jax.lax.scan(step, jnp.zeros((batch,), dtype), jnp.swapaxes(xs, 0, 1))
    return xs, jnp.swapaxes(ys, 0, 1)


def make_train_step(method: str, optimiser: optax.GradientTransformation):
    """One jitted Adam step; returns the new model, optimiser state and warm start."""

    def forward(model, xs, h0, guess):
        if method == "BPTT":
            states = prnn.solve_sequential(model.cell, xs, h0)
            return states, jnp.array(0, jnp.int32), jnp.array(True)
        solver = prnn.DEER() if method == "DEER" else prnn.QuasiDEER()
        sol = prnn.solve_parallel(model.cell, xs, h0, solver, guess=guess, throw=False)
        return sol.states, sol.num_steps, sol.converged

    def loss_fn(model, xs, ys, h0, guess):
        states, num_steps, converged = jax.vmap(forward, in_axes=(None, 0, None, 0))(
            model, xs, h0, guess
        )
        preds = jax.vmap(jax.vmap(model.readout))(states)[..., 0]
        return jnp.mean((preds - ys) ** 2), (states, num_steps, converged)

    @eqx.filter_jit
    def train_step(model, opt_state, xs, ys, h0, guess):
        (loss, (states, num_steps, converged)), grads = eqx.filter_value_and_grad(
            loss_fn, has_aux=True
        )(model, xs, ys, h0, guess)
        # Optax mixes Python floats with int32 step counts; the test suite runs with
        # strict promotion (for the library's sake), so allow it for the optimiser.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimiser.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        model = eqx.apply_updates(model, updates)
        return model, opt_state, states, loss, jnp.max(num_steps), jnp.all(converged)

    return train_step


def train(method, model, xs, ys, h0, steps, lr):
    # Clipping keeps the occasional loss spike of a long-memory GRU from throwing
    # the three runs onto different paths; the cosine decay keeps the late,
    # low-loss phase from amplifying round-off differences between them.
    schedule = optax.cosine_decay_schedule(lr, steps)
    optimiser = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    opt_state = optimiser.init(eqx.filter(model, eqx.is_array))
    train_step = make_train_step(method, optimiser)
    # The default guess of solve_parallel (h0 repeated) as the first warm start.
    guess = jnp.broadcast_to(h0, (*xs.shape[:2], h0.shape[0]))
    rows = []
    for i in progress(range(steps), desc=method, leave=False):
        t0 = time.perf_counter()
        model, opt_state, guess, loss, iters, converged = train_step(
            model, opt_state, xs, ys, h0, guess
        )
        loss = float(loss)  # blocks until the step is done
        rows.append(
            dict(
                solver=method,
                step=i,
                loss=loss,
                num_steps=int(iters) if method != "BPTT" else "",
                converged=bool(converged),
                step_time_s=time.perf_counter() - t0,
            )
        )
    return rows


def run(args) -> tuple[dict[str, list[dict]], dict]:
    """Train once per solver from the same initialisation; rows per Adam step."""
    T = (args.T or [by_mode(args, smoke=64, quick=512, full=4096)])[0]
    steps = args.steps or by_mode(args, smoke=3, quick=30, full=300)
    hidden = (args.D or [by_mode(args, smoke=4, quick=8, full=8)])[0]
    batch = args.batch or by_mode(args, smoke=2, quick=4, full=4)
    dtype = jnp.dtype(args.dtype)
    key_data, key_model = jax.random.split(jax.random.key(args.seed))
    xs, ys = make_data(key_data, batch, T, args.decay, dtype)
    model = Model(hidden, dtype, key=key_model)
    h0 = jnp.zeros(hidden, dtype)
    setup = dict(hidden=hidden, T=T, batch=batch, steps=steps, dtype=dtype.name)
    curves = {}
    methods = ["BPTT", *(m for m in args.solvers if m != "BPTT")]
    for method in progress(methods, desc="methods"):
        curves[method] = train(method, model, xs, ys, h0, steps, args.lr)
    return curves, setup


def tabulate(curves: dict[str, list[dict]]) -> list[dict]:
    """One summary row per solver, compared with the BPTT loss curve."""
    bptt = np.array([r["loss"] for r in curves["BPTT"]])
    summary = []
    for method, mrows in curves.items():
        loss = np.array([r["loss"] for r in mrows])
        times = np.array([r["step_time_s"] for r in mrows])
        iters = [r["num_steps"] for r in mrows if r["num_steps"] != ""]
        rel = np.abs(loss - bptt) / np.abs(bptt)
        summary.append(
            dict(
                solver=method,
                first_loss=float(loss[0]),
                final_loss=float(loss[-1]),
                max_rel_diff_vs_BPTT=float(np.max(rel)),
                # Round-off differences grow through the optimiser's path; this says
                # for how long the curves stay within 1e-3 of each other.
                steps_within_1em3=int(np.argmax(rel > 1e-3)) if np.any(rel > 1e-3) else len(rel),
                step_ms_median=1e3 * float(np.median(times[1:])) if len(times) > 1 else "",
                first_step_s=float(times[0]),  # includes compilation
                num_steps_mean=float(np.mean(iters)) if iters else "",
                num_steps_max=int(np.max(iters)) if iters else "",
                not_converged=sum(not r["converged"] for r in mrows),
            )
        )
    return summary


def plot(curves: dict[str, list[dict]], setup: dict, path) -> None:
    plt = pyplot()
    fig, (ax_loss, ax_iter) = plt.subplots(1, 2, figsize=(10, 4))
    for method, mrows in curves.items():
        step = [r["step"] for r in mrows]
        look = dict(style(method), marker="", lw=2)
        ax_loss.semilogy(step, [r["loss"] for r in mrows], label=method, **look)
        if method != "BPTT":
            ax_iter.plot(step, [r["num_steps"] for r in mrows], label=method, **look)
    ax_loss.set_xlabel("Adam step")
    ax_loss.set_ylabel("training MSE")
    ax_loss.set_title(f"GRU D={setup['hidden']}, T={setup['T']}, {setup['dtype']}")
    ax_loss.legend()
    ax_iter.set_xlabel("Adam step")
    ax_iter.set_ylabel("forward iterations (max over batch)")
    ax_iter.set_title("warm-started from the previous step")
    ax_iter.legend()
    save_figure(fig, path)


def main(argv=None) -> list[dict]:
    p = study_parser(__doc__, solvers=METHODS)
    p.add_argument("--steps", type=int, default=None, help="Adam steps (default 300)")
    p.add_argument("--batch", type=int, default=None, help="sequences per batch (default 4)")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--decay", type=float, default=0.9, help="leak a of the target integral")
    args = parse(p, argv, solver_names=METHODS)
    with dtype_scope(args):
        curves, setup = run(args)
    print(
        f"cells.GRU hidden={setup['hidden']}, T={setup['T']}, batch={setup['batch']}, "
        f"steps={setup['steps']}, {setup['dtype']}, Adam lr={args.lr} (cosine decay, clip 1), "
        f"backend={jax.default_backend()}"
    )
    summary = tabulate(curves)
    print(format_table(summary))
    for s in summary[1:]:
        print(
            f"max relative difference of the {s['solver']} loss curve vs BPTT: "
            f"{s['max_rel_diff_vs_BPTT']:.3g}"
        )
    if any(s["not_converged"] for s in summary):
        print("WARNING: some forward solves did not converge (see the `converged` column)")
    write_csv(args.out / "train.csv", [r for rows in curves.values() for r in rows])
    write_csv(args.out / "train_summary.csv", summary)
    plot(curves, setup, args.out / "train.png")
    written = ", ".join(str(args.out / n) for n in ("train.csv", "train_summary.csv", "train.png"))
    print(f"wrote {written}")
    return summary


if __name__ == "__main__":
    main()
