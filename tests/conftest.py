import jax
import pytest


# Tests run with float64 available; float32 tests ask for it explicitly.
jax.config.update("jax_enable_x64", True)
# Strict promotion, as in Optimistix/Lineax: an implicit rank broadcast or a
# mixed-dtype operation in the library is a bug that would silently upcast
# float32 states (or broadcast a wrong shape), so the tests make it an error.
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture(scope="module", autouse=True)
def _fresh_compilation_caches():
    """Drop JAX's compiled executables after each test module.

    One pytest process compiles thousands of solves; the suite once died with a
    segmentation fault inside XLA's compilation about an hour into a run on a
    loaded 2-core machine (issue 23), which `experiments/soak.py` does not
    reproduce in isolation. Tests share compiled functions within a module, not
    across modules, so clearing between modules costs little and keeps the number
    of live executables (and their memory) bounded.
    """
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
