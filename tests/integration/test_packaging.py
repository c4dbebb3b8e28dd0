"""Installed from its wheel, outside any checkout, mpipeline starts and serves (issue 19).

What a new user does: install the wheel into a fresh venv, then in a folder
with no ``config/`` run ``mpipeline config init``/``export`` and ``mpipeline
run --port 0 --metrics-port 0`` on the built-in defaults, send a chat
completion with the official ``openai`` SDK, and stop it with SIGTERM: exit 0,
no process and no segment left.

How it stays offline and quick (about 7 s before the run itself):

- The wheel is built from a copy of the sources (``pyproject.toml``,
  ``README.md``, ``LICENSE``, ``mpipeline/``) with ``pip wheel --no-deps
  --no-build-isolation``, so no build tool is fetched and the checkout gets no
  ``build/``.
- The venv is plain (``venv --without-pip``; no system site-packages) and
  this venv's pip installs into it (``pip --python``) with ``--no-index
  --find-links`` a wheelhouse, with pip's own config files switched off.
- The wheelhouse is made here, from the project's ``.venv``: pip's cache holds
  no downloaded wheels on our machines (only the ones it built), so for each
  distribution the wheel needs (its Requires-Dist, extras and markers followed
  transitively) the files its RECORD lists are zipped back into a wheel with
  its own tag. ``.venv`` holds exactly the lock (``tests/unit/test_lock.py``),
  and pip resolves the wheel's declared dependencies from that folder alone,
  so a dependency missing from ``pyproject.toml`` fails here as it would for
  a user.
"""

from __future__ import annotations

import base64
import contextlib
import email
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from packaging.requirements import Requirement

from mpipeline import config
from tests.integration.conftest import BOOT_TIMEOUT_S, STOP_TIMEOUT_S, run_segments, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]
# What the wheel is built from: everything pyproject.toml refers to.
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "mpipeline")
PIP_TIMEOUT_S = 120.0
CLI_TIMEOUT_S = 30.0
_GATEWAY_URL = re.compile(r"mpipeline\.supervisor: gateway listening on (http://\S+)")
# Variables of this shell that must not reach the installed mpipeline or its pip.
_DROPPED = ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
_DROPPED_PREFIXES = ("MPIPELINE_", "PIP_")


class Installed:
    """The scratch venv with the wheel installed, and how to run its ``mpipeline``."""

    def __init__(self, venv: Path, wheel: Path) -> None:
        self.venv = venv
        self.wheel = wheel
        self.mpipeline = venv / "bin" / "mpipeline"

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in _DROPPED and not k.startswith(_DROPPED_PREFIXES)
        }
        return {**env, "MPIPELINE_LOG_FORMAT": "text", **extra}

    def cli(self, *args: str, cwd: Path, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.mpipeline), *args],
            cwd=cwd,
            env=self.env(**extra),
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
            check=False,
        )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    tmp = tmp_path_factory.mktemp("packaging")
    wheel = build_wheel(tmp / "src", tmp / "dist")
    house = tmp / "wheelhouse"
    house.mkdir()
    for dist in needed_distributions(wheel):
        repack(dist, house)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    pip(
        "--python",
        str(venv / "bin" / "python"),
        "install",
        "--no-index",
        "--find-links",
        str(house),
        str(wheel),
    )
    return Installed(venv, wheel)


def pip(*args: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull  # no machine-wide index, find-links or constraints
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--quiet", "--disable-pip-version-check", "--no-cache-dir"]
        + list(args),
        env=env,
        capture_output=True,
        text=True,
        timeout=PIP_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, f"pip {' '.join(args)}:\n{done.stdout}{done.stderr}"


def build_wheel(src: Path, dist: Path) -> Path:
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
            shutil.copytree(ROOT / name, src / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, src / name)
    pip("wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(dist), str(src))
    [wheel] = dist.glob("mpipeline-*.whl")
    return wheel


def needed_distributions(wheel: Path) -> list[importlib.metadata.Distribution]:
    """The installed distributions that the wheel's dependencies resolve to, transitively."""
    with zipfile.ZipFile(wheel) as z:
        [meta] = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        text = z.read(meta).decode()
    todo = [
        (Requirement(r), "") for r in email.message_from_string(text).get_all("Requires-Dist") or []
    ]
    extras: dict[str, set[str]] = {}
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        wanted = {"", *req.extras}
        have = extras.setdefault(canonical(req.name), set())
        if wanted <= have:
            continue
        have |= wanted
        requires = importlib.metadata.distribution(req.name).requires or []
        todo += [(Requirement(r), e) for r in requires for e in wanted]
    return [importlib.metadata.distribution(name) for name in sorted(extras)]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def repack(dist: importlib.metadata.Distribution, into: Path) -> Path:
    """Zip an installed distribution back into a wheel: its files under site-packages
    (no byte code, no installer records) and a fresh RECORD."""
    site = Path(str(dist.locate_file(""))).resolve()
    wheel_info = dist.read_text("WHEEL") or ""
    tag = next(line.split(":", 1)[1].strip() for line in wheel_info.splitlines() if "Tag:" in line)
    name = re.sub(r"[-_.]+", "_", dist.metadata["Name"])
    path = into / f"{name}-{dist.version}-{tag}.whl"
    info_dir = f"{name}-{dist.version}.dist-info"
    record = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for file in dist.files or ():
            src = Path(str(dist.locate_file(file))).resolve()
            if site not in src.parents or "__pycache__" in file.parts:
                continue  # scripts outside site-packages come back from entry points
            if file.parts[0].endswith(".dist-info"):
                info_dir = file.parts[0]
                if file.name in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json"):
                    continue
            data = src.read_bytes()
            z.writestr(str(file), data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            record.append(f"{file},sha256={digest.decode()},{len(data)}")
        record.append(f"{info_dir}/RECORD,,")
        z.writestr(f"{info_dir}/RECORD", "\n".join(record) + "\n")
    return path


# The tests


def test_the_package_is_the_wheel_not_the_checkout(installed: Installed, tmp_path: Path) -> None:
    where = subprocess.run(
        [
            str(installed.venv / "bin" / "python"),
            "-c",
            "import mpipeline; print(mpipeline.__file__)",
        ],
        cwd=tmp_path,
        env=installed.env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(installed.venv), where
    assert installed.cli("--version", cwd=tmp_path).stdout.strip() == "mpipeline 0.1.0"


def test_config_init_and_export_from_the_wheel(installed: Installed, tmp_path: Path) -> None:
    printed = installed.cli("config", "init", cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == (ROOT / "config" / "pipeline.toml").read_text()
    assert installed.cli("config", "init", "pipeline.toml", cwd=tmp_path).returncode == 0
    again = installed.cli("config", "init", "pipeline.toml", cwd=tmp_path)
    assert (again.returncode, again.stderr) == (2, "pipeline.toml: exists; --force overwrites it\n")
    valid = installed.cli("config", "validate", "pipeline.toml", cwd=tmp_path)
    assert (valid.returncode, valid.stdout) == (0, "pipeline.toml: ok\n")

    exported = installed.cli("config", "export", "out", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    shipped = config.shipped_files()
    assert exported.stdout.splitlines() == [f"wrote out/{name}" for name in shipped]
    for name, data in shipped.items():
        assert (tmp_path / "out" / name).read_bytes() == data, name
        if name != "pipeline.toml":  # the repository's copy is a link to the same file
            assert (ROOT / "config" / name).read_bytes() == data, name


def test_run_on_the_defaults_serves_a_chat_completion(installed: Installed, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    xdg = tmp_path / "xdg"  # a run dir of its own: never another run's port-8080 or default
    xdg.mkdir(mode=0o700)
    log_path = tmp_path / "run.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(installed.mpipeline), "run", "--port", "0", "--metrics-port", "0"],
            cwd=work,
            env=installed.env(XDG_RUNTIME_DIR=str(xdg)),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        with explain(log_path):
            serve_one_and_stop(installed, proc, log_path, work, xdg / "mpipeline" / "default")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def serve_one_and_stop(
    installed: Installed, proc: subprocess.Popen[bytes], log_path: Path, work: Path, run_dir: Path
) -> None:
    def gateway_url() -> str | None:
        assert proc.poll() is None, f"mpipeline run exited with {proc.returncode}"
        found = _GATEWAY_URL.search(log_path.read_text(errors="replace"))
        return found[1] if found else None

    url: str = wait_until(gateway_url, BOOT_TIMEOUT_S, "the gateway URL in the log")
    assert "running on the built-in defaults" in log_path.read_text()
    status = installed.cli("status", "--json", "--run-dir", str(run_dir), cwd=work)
    assert status.returncode == 0, status.stderr
    state = json.loads(status.stdout)
    assert state["gateway_url"] == url and state["metrics_url"]
    assert state["config"] == str(run_dir / "effective.toml")
    assert config.load(run_dir / "effective.toml") == config.load(
        None, {"gateway.port": 0, "metrics.port": 0}
    )

    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as sdk:
        completion = sdk.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "hello from a wheel"}]
        )
    assert completion.choices[0].message.content == "hello from a wheel"
    # The web dashboard's page, script and style are package data: served from the wheel.
    board = state["metrics_url"].removesuffix("/metrics") + "/dashboard"
    for page in (board, f"{board}/static/dashboard.js", f"{board}/static/dashboard.css"):
        assert httpx.get(page, timeout=CLI_TIMEOUT_S).status_code == 200, page

    children = psutil.Process(proc.pid).children(recursive=True)
    assert children
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(STOP_TIMEOUT_S) == 0
    _, alive = psutil.wait_procs(children, timeout=5)
    assert alive == []
    assert run_segments(state["run_id"]) == []


@contextlib.contextmanager
def explain(log_path: Path) -> Iterator[None]:
    """Append the run's log to an assertion that fails inside."""
    try:
        yield
    except AssertionError as exc:
        log = log_path.read_text(errors="replace")[-6000:]
        raise AssertionError(f"{exc}\n--- mpipeline run log ---\n{log}") from exc
