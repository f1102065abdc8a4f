"""Every fenced Python block of README.md and docs/**/*.md runs, so the docs cannot go stale.

The blocks of one page run in order in one namespace (later blocks use the names
of earlier ones), in a fresh Python process per page: the examples see JAX's
defaults (float32, strict promotion off) and not the test suite's configuration,
a page that needs float64 can turn it on in its own block, and the process sees
four forced host devices (for the sharding examples). A block is skipped when the
line before its opening fence is the HTML comment `<!-- fragment -->` (invisible in
the rendered page): use it for snippets that are not meant to run on their own.
Only blocks whose info string starts with `python` run; `bash` and others never do.

Run one page by hand with `python tests/test_docs.py docs/gradients.md` (it prints
the seconds each block took); `pytest -m "not docs"` leaves these tests out.
"""

import os
import sys
import time
from pathlib import Path

import pytest


pytestmark = pytest.mark.docs

ROOT = Path(__file__).resolve().parent.parent
FRAGMENT = "<!-- fragment -->"
PAGES = sorted(
    [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")],
    key=lambda p: p.relative_to(ROOT).as_posix(),
)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """`(line, source)` of each runnable fenced Python block; `line` is the 1-based
    line of the block's first source line. Fragments are left out."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        stripped = lines[i].strip()
        if not stripped.startswith("```"):
            i += 1
            continue
        fence = stripped[: len(stripped) - len(stripped.lstrip("`"))]
        info = stripped[len(fence) :].strip()
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        previous = next((lines[k].strip() for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        if info.split(" ")[0] == "python" and previous != FRAGMENT:
            blocks.append((i + 2, "\n".join(lines[i + 1 : end])))
        i = end + 1
    return blocks


def run_page(path: Path) -> None:
    """Run the page's blocks in order in one namespace (in this process)."""
    namespace: dict = {"__name__": "__docs__"}
    for line, source in python_blocks(path.read_text()):
        # Pad so that tracebacks point at the page's own line numbers.
        code = compile("\n" * (line - 1) + source, str(path), "exec")
        start = time.perf_counter()
        exec(code, namespace)
        print(f"{path}:{line}: {time.perf_counter() - start:.1f} s", flush=True)


def test_collector_reads_blocks_and_fragments():
    text = "\n".join(
        [
            "```python",
            "a = 1",
            "```",
            "```bash",
            "exit 1",
            "```",
            FRAGMENT,
            "",
            "```python",
            "raise RuntimeError",
            "```",
            "````python",
            "b = '```'",
            "````",
        ]
    )
    assert python_blocks(text) == [(2, "a = 1"), (13, "b = '```'")]


RUNNABLE = [p for p in PAGES if python_blocks(p.read_text())]


def _page_job(page: Path):
    from .background import Job

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["MPLBACKEND"] = "Agg"
    env["XLA_FLAGS"] = " ".join(
        filter(None, [env.get("XLA_FLAGS"), "--xla_force_host_platform_device_count=4"])
    )
    env.pop("JAX_ENABLE_X64", None)
    return Job((sys.executable, __file__, str(page)), ROOT, env, timeout=600)


def background_jobs(item):
    """The page a selected `test_page_runs` needs, run ahead (`tests/background.py`)."""
    if item.originalname == "test_page_runs":
        page = item.callspec.params["page"]
        yield f"docs:{page}", _page_job(page)


@pytest.mark.parametrize("page", RUNNABLE, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_page_runs(page: Path):
    from .background import RUNNER

    done = RUNNER.result(f"docs:{page}", _page_job(page))
    assert done.returncode == 0, f"{page.name} failed:\n{done.stdout}\n{done.stderr[-6000:]}"


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        run_page(Path(arg))
