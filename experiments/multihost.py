"""Multi-host sequence sharding: one process per host, `jax.distributed`, `solve_sharded`.

On every host (here: process `i` of `n`, coordinator on host 0):

    python -m experiments.multihost --coordinator HOST0:1234 --num-processes n --process-id i

Every process sees all `jax.devices()` of all hosts; the time axis of one
sequence is split over all of them, each process builds only its own shards
(`jax.make_array_from_callback`), and each checks the gathered trajectory and
the gradient against an unsharded solve of the whole (small) sequence. On
CPUs the collectives need `--cpu-collectives gloo` (the default here; ignored on
GPUs, which use NCCL).

To try it on one machine, `--local 2` starts two such processes on 127.0.0.1
and waits for them (this is what `tests/test_sharding.py` runs).
"""

import argparse
import os
import subprocess
import sys


def worker(args) -> None:
    import jax

    if args.cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", args.cpu_collectives)
    jax.config.update("jax_enable_x64", True)
    jax.distributed.initialize(
        coordinator_address=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
    )
    import equinox as eqx
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import parallel_rnn as prnn

    T, D, N_IN = args.T, 3, 2
    cell = prnn.cells.GRU(N_IN, D, key=jax.random.key(0), dtype=jnp.float64)
    xs_full = np.asarray(jax.random.normal(jax.random.key(1), (T, N_IN), jnp.float64))
    s0 = jnp.full((D,), 0.1, jnp.float64)

    mesh = Mesh(np.array(jax.devices()), ("t",))
    sharding = NamedSharding(mesh, P("t"))
    # Each process materialises only the rows of its own devices.
    xs = jax.make_array_from_callback(xs_full.shape, sharding, lambda index: xs_full[index])

    def loss(cell, xs):
        sol = prnn.solve_sharded(cell, xs, s0, prnn.DEER(), mesh=mesh, axis_name="t")
        return jnp.sum(jnp.sin(sol.states)), sol.states

    (_, states), grad = eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))(cell, xs)
    states = multihost_utils.process_allgather(states, tiled=True)
    grad = multihost_utils.process_allgather(grad, tiled=True)

    def loss_ref(cell):
        sol = prnn.solve_parallel(cell, jnp.asarray(xs_full), s0, prnn.DEER())
        return jnp.sum(jnp.sin(sol.states)), sol.states

    with jax.default_device(jax.local_devices()[0]):
        (_, ref), grad_ref = eqx.filter_value_and_grad(loss_ref, has_aux=True)(cell)
    ds = float(np.max(np.abs(np.asarray(states) - np.asarray(ref))))
    diffs = jax.tree_util.tree_map(
        lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), grad, grad_ref
    )
    dg = max(jax.tree_util.tree_leaves(diffs))
    print(
        f"process {jax.process_index()}/{jax.process_count()}: {jax.device_count()} devices, "
        f"T={T}, |states - unsharded|={ds:.2e}, |grad - unsharded|={dg:.2e}",
        flush=True,
    )
    if not (ds <= 1e-10 and dg <= 1e-10):
        sys.exit(1)


def launch_local(n: int, port: int, T: int) -> int:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "experiments.multihost",
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                str(n),
                "--process-id",
                str(i),
                "--T",
                str(T),
            ],
            env=env,
        )
        for i in range(n)
    ]
    codes = [p.wait(timeout=300) for p in procs]
    return max(abs(c) for c in codes)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--coordinator", default="127.0.0.1:12355")
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--cpu-collectives", default="gloo")
    p.add_argument("--T", type=lambda t: int(float(t)), default=64, help="length (1e3 accepted)")
    p.add_argument("--local", type=int, default=0, help="start this many local processes")
    p.add_argument("--port", type=int, default=12355)
    args = p.parse_args(argv)
    if args.local:
        sys.exit(launch_local(args.local, args.port, args.T))
    worker(args)


if __name__ == "__main__":
    main()
