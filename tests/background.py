"""Subprocesses that tests wait on, started ahead of them in one background thread.

A few tests run a fresh Python process (the docs pages, the sharding checks with
forced host devices, the two-process launch). Meanwhile the pytest process itself
compiles on one core, so on CI's two cores these subprocesses can run alongside
the other tests instead of after them. Once the session knows its tests
(`conftest.pytest_collection_finish`), each test module with a `background_jobs(item)`
function names the jobs its selected tests need, and one worker thread runs them
in that order, one at a time. A test asks for its job's result with `Runner.result`:
a job not yet started then runs in the test itself (so a test never waits behind
an unrelated job); while a job runs in the worker, its test runs the next queued
jobs of the same group (the docs pages) instead of idling. The result is the same
`subprocess.CompletedProcess` that a direct `subprocess.run` would give.

`PARALLEL_RNN_TESTS_BACKGROUND=0` turns the worker off: every job then runs in its
test, as plain `subprocess.run` calls did.
"""

import dataclasses
import os
import subprocess
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Job:
    """`subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=…)`."""

    argv: Sequence[str]
    cwd: Path
    env: Mapping[str, str]
    timeout: float


class Runner:
    def __init__(self):
        self._lock = threading.Condition()
        self._jobs: dict[str, Job] = {}
        self._state: dict[str, str] = {}  # "queued", "running", "done"
        self._results: dict[str, subprocess.CompletedProcess | BaseException] = {}
        self._running: set[subprocess.Popen] = set()
        self._closed = False
        self._thread: threading.Thread | None = None

    def add(self, key: str, job: Job) -> None:
        """Queue `job` under `key` (a key already known keeps its first job)."""
        with self._lock:
            if key not in self._jobs:
                self._jobs[key] = job
                self._state[key] = "queued"

    def start(self) -> None:
        """Start the worker thread (unless turned off by the environment)."""
        if os.environ.get("PARALLEL_RNN_TESTS_BACKGROUND", "1") == "0" or self._thread:
            return
        self._thread = threading.Thread(target=self._work, name="test-subprocesses", daemon=True)
        self._thread.start()

    def result(self, key: str, job: Job) -> subprocess.CompletedProcess:
        """The finished `job`: run here if nobody started it yet, else waited for.

        While it runs in the worker, this thread runs the next queued jobs of its
        group (the key up to its first ":", e.g. the other docs pages) instead of
        idling; never another group's, which may take far longer than this one.
        """
        self.add(key, job)
        group = key.split(":")[0] + ":"
        while True:
            with self._lock:
                if self._state[key] == "done":
                    outcome = self._results[key]
                    break
                mine = [k for k in self._jobs if k == key or k.startswith(group)]
                here = next((k for k in mine if self._claim(k)), None)
                if here is None:
                    self._lock.wait_for(lambda: self._state[key] == "done")
                    continue
            self._run(here)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def close(self) -> None:
        """Start nothing more and stop the subprocesses still running."""
        with self._lock:
            self._closed = True
            running = list(self._running)
        for proc in running:
            proc.kill()

    def _claim(self, key: str) -> bool:
        if self._state[key] != "queued":
            return False
        self._state[key] = "running"
        return True

    def _work(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                key = next((k for k in self._jobs if self._claim(k)), None)
            if key is None:
                return
            self._run(key)

    def _run(self, key: str) -> None:
        job = self._jobs[key]
        outcome: subprocess.CompletedProcess | BaseException
        try:
            with self._lock:
                if self._closed:
                    raise RuntimeError("the test session ended before this job ran")
                proc = subprocess.Popen(
                    list(job.argv),
                    cwd=job.cwd,
                    env=dict(job.env),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                self._running.add(proc)
            try:
                out, err = proc.communicate(timeout=job.timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                raise subprocess.TimeoutExpired(job.argv, job.timeout, out, err) from None
            finally:
                with self._lock:
                    self._running.discard(proc)
            outcome = subprocess.CompletedProcess(job.argv, proc.returncode, out, err)
        except BaseException as e:  # re-raised in the test that asks for it
            outcome = e
        with self._lock:
            self._results[key] = outcome
            self._state[key] = "done"
            self._lock.notify_all()


RUNNER = Runner()
