import jax
import pytest


# Tests run with float64 available; float32 tests ask for it explicitly.
jax.config.update("jax_enable_x64", True)
# Strict promotion, as in Optimistix/Lineax: an implicit rank broadcast or a
# mixed-dtype operation in the library is a bug that would silently upcast
# float32 states (or broadcast a wrong shape), so the tests make it an error.
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
# The tests' programs are tiny, so compiling them is nearly all the suite's time,
# and LLVM's optimisation of the generated code is a third of that: this sets
# XLA's backend optimisation level to 0 and skips LLVM's expensive passes. The
# HLO passes still run, so the optimised programs and their buffers are the ones
# users get (checked: the same HLO text and temp bytes for a GRU's gradient).
# Measured: test_grad 76 -> 48 s, test_solve 123 -> 84 s, test_cells 94 -> 65 s
# of CPU. The generated code can round differently in the last bits, though: a
# module whose tests count iterations on a problem that sensitive to round-off
# sets `XLA_FULL_OPTIMISATION = True` and runs at the default level (see
# `_module_setup`). tests/test_sharding.py's subprocess runs without them too
# (JAX_DISABLE_MOST_OPTIMIZATIONS); the docs pages run at JAX's defaults.
jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture(scope="module", autouse=True)
def _module_setup(request):
    """The module's XLA optimisation level (above); JAX's caches dropped after it.

    One pytest process compiles thousands of solves; the suite once died with a
    segmentation fault inside XLA's compilation about an hour into a run on a
    loaded 2-core machine (issue 23), which `experiments/soak.py` does not
    reproduce in isolation. Tests share compiled functions within a module, not
    across modules, so clearing between modules costs little and keeps the number
    of live executables (and their memory) bounded. It also keeps executables
    compiled at one optimisation level out of a module that asks for the other.
    """
    full = bool(getattr(request.module, "XLA_FULL_OPTIMISATION", False))
    jax.config.update("jax_disable_most_optimizations", not full)
    yield
    jax.clear_caches()


def pytest_collection_finish(session):
    """Queue the subprocess jobs of the selected tests and start running them
    (`tests/background.py`): on two cores they overlap the in-process tests."""
    from .background import RUNNER

    for item in session.items:
        jobs = getattr(getattr(item, "module", None), "background_jobs", None)
        if jobs is not None:
            for key, job in jobs(item):
                RUNNER.add(key, job)
    RUNNER.start()


def pytest_sessionfinish(session):
    from .background import RUNNER

    RUNNER.close()
