"""Shared plumbing of the studies: arguments, timing, memory, CSV, tables, plots."""

import argparse
import csv
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax


SOLVER_NAMES = ("DEER", "QuasiDEER", "ELK", "QuasiELK", "Picard", "Jacobi")


def available_solvers(names=SOLVER_NAMES) -> dict:
    """Default-configured solvers of `names` that this version of `parallel_rnn` has.

    A solver's `jacobian` attribute (`"dense"` or `"diagonal"`) says whether it
    stores `T·D²` Jacobian entries.
    """
    import parallel_rnn as prnn

    return {n: getattr(prnn, n)() for n in names if hasattr(prnn, n)}


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every study takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes, for a CPU in minutes")
    p.add_argument("--out", type=Path, default=Path("results"), help="folder for CSV and PNG")
    p.add_argument("--reps", type=int, default=None, help="timing repetitions (median is kept)")
    return p


def time_fn(fn: Callable[[], Any], reps: int = 5, warmup: int = 1) -> tuple[float, float]:
    """Median and spread (max - min) in seconds of `fn()`, after compilation.

    `fn` must return JAX arrays; we block on them so asynchronous dispatch does
    not hide the work.
    """
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), max(times) - min(times)


def compiled_memory(fn: Callable, *args, **kwargs) -> int | None:
    """Peak bytes of `fn(*args, **kwargs)` compiled by XLA (temporaries + outputs + args).

    `fn` may be any function of pytrees (an `eqx.filter_jit` one too): the arrays
    in the arguments become the jitted inputs, everything else is static. Nothing
    is run. `None` where the backend does not report a memory analysis.
    """
    dynamic, static = eqx.partition((args, kwargs), eqx.is_array)

    def call(dynamic):
        a, k = eqx.combine(dynamic, static)
        return fn(*a, **k)

    return executable_memory(jax.jit(call).lower(dynamic).compile())


def executable_memory(compiled) -> int | None:
    """Peak bytes of an already compiled executable (`jax.jit(f).lower(...).compile()`)."""
    try:
        analysis = compiled.memory_analysis()
    except NotImplementedError:
        return None
    if analysis is None:
        return None
    return int(
        analysis.temp_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.argument_size_in_bytes
        - getattr(analysis, "alias_size_in_bytes", 0)
    )


def device_peak_bytes() -> int | None:
    """The device allocator's peak bytes in use (GPU), or `None` (CPU)."""
    stats = jax.devices()[0].memory_stats()
    if not stats:
        return None
    return stats.get("peak_bytes_in_use")


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not rows:
        raise ValueError(f"no rows to write to {path}")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)


def format_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A plain-text table (also valid Markdown) of `rows`."""
    columns = list(columns or rows[0].keys())

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
    out = [line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in cells]
    return "\n".join(out)


def progress(iterable: Iterable, **kwargs) -> Iterable:
    """A tqdm progress bar when tqdm is installed, the bare iterable otherwise."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, **kwargs)


def pyplot():
    """Matplotlib's pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
