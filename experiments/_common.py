"""Shared plumbing of the studies: one command line, one CSV vocabulary, timing, plots.

Every study is `python -m experiments.NAME` and is written in three parts,
`run(args) -> rows`, `tabulate(rows) -> str` and `plot(rows, path)`, tied
together by a short `main(argv)`. The API a study uses:

- `study_parser(description, *, solvers=…, dtype=…)`: the options every study takes:
  `--smoke` (seconds, for the tests; hidden), `--quick` (a CPU in minutes),
  `--T N [N ...]`, `--D N [N ...]` (numbers such as `1e4` accepted),
  `--solvers NAME [...]`, `--dtype float32|float64`, `--seed`, `--reps`,
  `--device auto|cpu|gpu`, `--out DIR`. A study adds its own options to it.
- `parse(parser, argv, *, solver_names=…)`: parses, checks `--solvers` and
  `--device`, and sets `args.mode` to
  `"smoke"`, `"quick"` or `"full"`; `by_mode(args, smoke=…, quick=…, full=…)` picks
  a size, and `args.T`/`args.D` are `None` unless given.
- `dtype_scope(args)`: a context in which `args.dtype` is available (float64 is
  enabled for that block only, never globally), on `args.device`.
- `solvers(args)` / `available_solvers(names)`: default-configured solvers by name;
  `select_device(kind)`: the JAX device of `--device`.
- `time_fn`, `compiled_memory`, `executable_memory`, `device_peak_bytes`.
- `write_csv(path, rows)` (the column vocabulary: experiments/README.md),
  `format_table(rows)`, `progress(it)`.
- Plots: `pyplot()`, `save_figure(fig, path)` (saves and closes),
  `SOLVER_STYLE[name]` / `style(name)` (colour, marker, line style: overlapping
  curves stay visible), `positive(xs, ys)` (drops non-finite and non-positive
  points before a log axis), `plot_residuals(ax, traces, tol=…, capped=…)`.

The older names keep working for studies written against them: `parser` (the
smaller `--quick`/`--out`/`--reps` parser), `available_solvers`, `time_fn`,
`compiled_memory`, `executable_memory`, `device_peak_bytes`, `write_csv`,
`format_table`, `progress`, `pyplot`, `SOLVER_NAMES`.
"""

import argparse
import contextlib
import csv
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np


SOLVER_NAMES = ("DEER", "QuasiDEER", "ELK", "QuasiELK", "Picard", "Jacobi", "MultipleShooting")
MODES = ("smoke", "quick", "full")


def available_solvers(names: Iterable[str] = SOLVER_NAMES) -> dict:
    """Default-configured solvers by name, e.g. `{"DEER": prnn.DEER(), ...}`.

    A solver's `jacobian` attribute (`"dense"` or `"diagonal"`) says whether it
    stores `T·D²` Jacobian entries. Unknown names raise a `ValueError`.
    """
    import parallel_rnn as prnn

    unknown = [n for n in names if not isinstance(getattr(prnn, n, None), type)]
    if unknown:
        raise ValueError(f"unknown solver(s) {unknown}; choose from {SOLVER_NAMES}")
    return {n: getattr(prnn, n)() for n in names}


def parse_solver(expression: str):
    """`("QuasiELK(damping=0.1)", QuasiELK(damping=0.1))` from a solver expression,
    evaluated with `parallel_rnn`'s names in scope (the `--extra` option of studies)."""
    import parallel_rnn as prnn

    solver = eval(expression, {"__builtins__": {}}, {**vars(prnn), "prnn": prnn})  # noqa: S307
    if not isinstance(solver, prnn.AbstractSolver):
        raise ValueError(f"{expression!r} is not a parallel_rnn solver: {solver!r}")
    return expression, solver


def number(text: str) -> int:
    """An integer written as `1000`, `1e3` or `1_000` (the `type=` of size options)."""
    value = float(text.replace("_", ""))
    if value != int(value) or value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(value)


def parser(description: str) -> argparse.ArgumentParser:
    """The older, smaller parser (`--quick`, `--out`, `--reps`); see `study_parser`."""
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small sizes, for a CPU in minutes")
    p.add_argument("--out", type=Path, default=Path("results"), help="folder for CSV and PNG")
    p.add_argument("--reps", type=int, default=None, help="timing repetitions (median is kept)")
    return p


def study_parser(
    description: str,
    *,
    solvers: Sequence[str] = SOLVER_NAMES,
    dtype: str = "float32",
) -> argparse.ArgumentParser:
    """The options every study takes (see the module docstring); add your own to it."""
    p = parser(description)
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--T", type=number, nargs="+", default=None, help="sequence length(s), e.g. 1e3 1e4"
    )
    p.add_argument("--D", type=number, nargs="+", default=None, help="state size(s)")
    p.add_argument(
        "--solvers", nargs="+", default=list(solvers), metavar="NAME", help="solvers to run"
    )
    p.add_argument("--dtype", choices=("float32", "float64"), default=dtype)
    p.add_argument("--seed", type=int, default=0, help="PRNG seed of cells and inputs")
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "gpu"),
        default="auto",
        help="JAX platform (gpu: fail early if JAX sees none)",
    )
    return p


def parse(
    p: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    *,
    solver_names: Sequence[str] = SOLVER_NAMES,
) -> argparse.Namespace:
    """Parse `argv`; set `args.mode`; check `--solvers` against `solver_names` and `--device`."""
    args = p.parse_args(argv)
    args.mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    unknown = [n for n in getattr(args, "solvers", None) or () if n not in solver_names]
    if unknown:
        p.error(f"--solvers: unknown {unknown}; choose from {list(solver_names)}")
    if getattr(args, "device", "auto") != "auto":
        select_device(args.device)
    return args


def by_mode(args: argparse.Namespace, *, smoke, quick, full):
    """The value for the study's size mode (`--smoke`, `--quick` or neither)."""
    return {"smoke": smoke, "quick": quick, "full": full}[args.mode]


def select_device(kind: str):
    """The first JAX device of platform `kind` (`"auto"`: the default device)."""
    if kind == "auto":
        return jax.devices()[0]
    try:
        return jax.devices(kind)[0]
    except RuntimeError as err:
        raise SystemExit(f"--device {kind}: no such JAX device here ({err})") from err


@contextlib.contextmanager
def dtype_scope(args: argparse.Namespace) -> Iterator[None]:
    """Run a block with `args.dtype` available and on `args.device`.

    float64 is enabled for the block only (`jax.enable_x64`), so importing or
    running a study never changes JAX's global configuration.
    """
    device = select_device(getattr(args, "device", "auto"))
    with jax.enable_x64(getattr(args, "dtype", "float32") == "float64"):
        with jax.default_device(device):
            yield


def solvers(args: argparse.Namespace) -> dict:
    """The solvers named by `--solvers`, default-configured."""
    return available_solvers(args.solvers)


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


def write_csv(path: Path, rows: Sequence[Mapping]) -> None:
    """Write `rows` as CSV, creating the folder; a key missing from a row is left empty."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not rows:
        raise ValueError(f"no rows to write to {path}")
    with open(path, "w", newline="") as f:
        columns = list(dict.fromkeys(k for row in rows for k in row))
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
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


def save_figure(fig, path: Path, *, dpi: int = 120) -> Path:
    """Lay out, save and close `fig` (open figures would pile up over a sweep)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


# One look per solver in every figure. Markers and dashes differ as well as
# colours, so that curves lying on top of each other (QuasiDEER under QuasiELK
# on stable cells) both stay visible.
SOLVER_STYLE = {
    "sequential": dict(color="k", marker="", linestyle="-"),
    "BPTT": dict(color="k", marker="", linestyle="-"),
    "DEER": dict(color="C0", marker="o", linestyle="-"),
    "QuasiDEER": dict(color="C1", marker="s", linestyle="--"),
    "ELK": dict(color="C2", marker="^", linestyle="-."),
    "QuasiELK": dict(color="C3", marker="v", linestyle=":"),
    "MultipleShooting": dict(color="C6", marker="D", linestyle="-"),
    "Picard": dict(color="C4", marker="x", linestyle="-"),
    "Jacobi": dict(color="C5", marker="+", linestyle="--"),
}


def style(name: str) -> dict:
    """Matplotlib keywords of `name`'s look (`SOLVER_STYLE`, grey for others)."""
    return dict(SOLVER_STYLE.get(name, dict(color="grey", marker=".", linestyle="-")))


def positive(xs, ys) -> tuple[np.ndarray, np.ndarray]:
    """The points of `(xs, ys)` that a log axis can show: finite and `> 0`.

    A residual of exactly zero (converged to the last bit) or an overflowed one
    would otherwise stretch or break the axis.
    """
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    keep = np.isfinite(ys) & (ys > 0)
    return xs[keep], ys[keep]


def plot_residuals(
    ax,
    traces: Mapping[str, Sequence[float]],
    *,
    tol: float | None = None,
    capped: Iterable[str] = (),
) -> None:
    """Residual max-norm against iteration, one curve per solver, on log axes.

    - `traces`: solver name → residual after each iteration;
    - `tol`: draws the tolerance as a horizontal line (a solve stops below it);
    - `capped`: solvers that hit `max_steps`; their label says so and their last
      point is marked with a cross.

    The y-range ends three decades above the median first residual, so a
    solver that wanders far above it leaves the top of the plot (its label
    says how far) instead of squashing the others.
    """
    capped = set(capped)
    curves = {name: positive(np.arange(1, len(tr) + 1), tr) for name, tr in traces.items()}
    curves = {name: c for name, c in curves.items() if len(c[1])}
    # The top of the axis sits a little above the typical first residual (the
    # median over solvers): a solver that wanders far above it (undamped Newton
    # on a chaotic cell reaches 1e127) leaves the plot, labelled, instead of
    # squashing every other curve into a band at the bottom.
    top = 1e3 * float(np.median([c[1][0] for c in curves.values()] or [1.0]))
    for name, (it, res) in curves.items():
        notes = [f"hit max_steps at {int(it[-1])}"] if name in capped else []
        if res.max() > top:
            notes.append(f"off scale up to {res.max():.0e}")
        label = f"{name} ({', '.join(notes)})" if notes else name
        every = max(1, len(res) // 15)
        # Clipped far above the axis: the line still leaves the top, and matplotlib
        # does not overflow transforming values near 1e300.
        shown = np.minimum(res, 1e6 * top)
        ax.plot(it, shown, label=label, markevery=every, markersize=5, **style(name))
        if name in capped and res[-1] <= top:
            ax.plot(it[-1:], res[-1:], "X", color=style(name)["color"], markersize=9)
    if tol is not None:
        ax.axhline(tol, color="grey", lw=1, ls=":", label=f"tolerance {tol:.0e}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    if curves:
        lows = [c[1].min() for c in curves.values()] + ([tol] if tol is not None else [])
        ax.set_ylim(0.3 * min(lows), top)
    ax.set_xlabel("iteration")
    ax.set_ylabel("max |residual| = max_t |s_t - f(x_t, s_{t-1})|")
    ax.legend(fontsize="small")
