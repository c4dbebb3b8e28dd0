"""The README's "Adding a stage" recipe, done: its code blocks applied to a copy of the
package, and a pipeline run through the new stage.

Each python block of that README section starts with a comment naming the file
and where the block goes (``new file``, ``after LINE``, ``before LINE``); this
test applies them literally, so a refactor that moves where stages are
registered fails here until the recipe is brought up to date.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mpipeline.config import dump_toml
from tests.integration.conftest import ConfigFactory

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
SECTION = "### Adding a stage"
# "# path: new file", "# path: after <line>", "# path: before <line>"
_WHERE = re.compile(r"# (?P<path>\S+): (?:(?P<new>new file)|(?P<how>after|before) (?P<anchor>.+))")


def recipe() -> list[tuple[str, str, str | None, str]]:
    """The section's blocks as (path, new|after|before, anchor line, text)."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index(SECTION)
    end = readme.index("\n## ", start)
    steps = []
    for block in re.findall(r"```python\n(.*?)```", readme[start:end], re.DOTALL):
        first, _, body = block.partition("\n")
        where = _WHERE.fullmatch(first)
        assert where is not None, f"a recipe block must say where it goes: {first!r}"
        how = "new" if where["new"] else where["how"]
        steps.append((where["path"], how, where["anchor"], body))
    return steps


def apply(steps: list[tuple[str, str, str | None, str]], root: Path) -> None:
    for path, how, anchor, body in steps:
        target = root / path
        if how == "new":
            assert not target.exists(), f"{path} exists already"
            target.write_text(body)
            continue
        lines = target.read_text().splitlines(keepends=True)
        hits = [i for i, line in enumerate(lines) if line.strip() == (anchor or "").strip()]
        assert len(hits) == 1, f"{path}: the line {anchor!r} must appear once, not {len(hits)}"
        at = hits[0] + 1 if how == "after" else hits[0]
        lines[at:at] = [body]
        target.write_text("".join(lines))


RUN = textwrap.dedent(
    """
    import asyncio, sys
    from mpipeline import Pipeline

    async def main() -> None:
        async with Pipeline(sys.argv[1], boot_timeout_s=60) as p:
            done = await p.submit("hello there")
            chunks = [c.text async for c in p.stream("and you")]
        print(done.text)
        print(",".join(sorted(done.stamps)))
        print("".join(chunks))

    asyncio.run(main())
    """
)


def test_the_recipe_adds_a_working_stage(tmp_path: Path, configs: ConfigFactory) -> None:
    steps = recipe()
    assert {path for path, *_ in steps} >= {
        "mpipeline/stages/shout.py",
        "mpipeline/messages.py",
        "mpipeline/stages/__init__.py",
        "mpipeline/config/tables.py",
    }
    copy = tmp_path / "src"
    shutil.copytree(
        ROOT / "mpipeline", copy / "mpipeline", ignore=shutil.ignore_patterns("__pycache__")
    )
    apply(steps, copy)
    path = tmp_path / "pipeline.toml"
    path.write_text(dump_toml(configs({"metrics.enabled": False})))
    env = {**os.environ, "PYTHONPATH": str(copy)}
    done = subprocess.run(
        [sys.executable, "-c", RUN, str(path)],
        capture_output=True,
        text=True,
        timeout=100,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    text, stamps, streamed = done.stdout.splitlines()
    assert text == "HELLO THERE"
    assert stamps.split(",") == sorted(["rag", "assemble", "inference", "post", "shout", "stream"])
    assert streamed == "AND YOU"
