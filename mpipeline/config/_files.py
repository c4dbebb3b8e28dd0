"""Config files on disk: which one a command reads, and the files mpipeline ships.

Every command that reads a config (``run``, ``status``, ``top``, ``profile``,
``dlq``, ``config show``/``validate``) picks it with ``locate``, so they all
agree on which file, and so on which run dir. A pipeline installed from a
wheel has no checkout around it: with no file anywhere it runs on the
built-in defaults, and ``config init``/``export`` write out the commented
default config and the observability files that ship inside the package
(``files/``: the Grafana dashboard, the Prometheus alert rules and an example
Prometheus config; the repository's ``config/`` links to them).
"""

from __future__ import annotations

import errno
import os
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from mpipeline.config._commented import commented_toml
from mpipeline.config.tables import PipelineConfig

# Names a config file when no --config does (ignored when empty).
CONFIG_ENV = "MPIPELINE_CONFIG"
# Read when neither names one and it exists (relative to the working directory).
DEFAULT_PATH = Path("config/pipeline.toml")
# What `config export` calls the commented default config in its folder.
PIPELINE_TOML = "pipeline.toml"
# The folder of shipped files inside this package.
_SHIPPED = "files"


def locate(path: Path | None) -> Path | None:
    """The config file a command reads: ``path`` (its ``--config``), else
    ``$MPIPELINE_CONFIG``, else ``config/pipeline.toml`` if there is one here;
    None means the built-in defaults.

    A file named by the option or the variable is returned even when missing,
    so that reading it fails: a typo must not silently run on the defaults.
    """
    if path is not None:
        return path
    named = os.environ.get(CONFIG_ENV)
    if named:
        return Path(named)
    return DEFAULT_PATH if os.path.lexists(DEFAULT_PATH) else None


def default_toml() -> str:
    """The commented default ``pipeline.toml``: every field, its default and its text."""
    return commented_toml(PipelineConfig)


def shipped_files() -> dict[str, bytes]:
    """What ``config export`` writes, by path relative to its folder: the default
    ``pipeline.toml`` and every file under the package's ``files/``."""
    out = {PIPELINE_TOML: default_toml().encode()}
    _collect(resources.files(__package__ or "mpipeline.config").joinpath(_SHIPPED), "", out)
    return out


def _collect(folder: Traversable, prefix: str, out: dict[str, bytes]) -> None:
    for item in sorted(folder.iterdir(), key=lambda t: t.name):
        if item.is_dir():
            _collect(item, f"{prefix}{item.name}/", out)
        elif not item.name.startswith("."):
            out[f"{prefix}{item.name}"] = item.read_bytes()


def write_new(path: Path, data: bytes, force: bool = False) -> None:
    """Write ``data`` to ``path``, making its missing parent folders.

    :raises FileExistsError: when ``path`` exists and ``force`` is false
    :raises OSError: when it cannot be written (permissions, not a folder, full disk)
    """
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a file where a folder should be: not "exists, use --force"
        raise NotADirectoryError(
            errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path.parent)
        ) from None
    # "x" creates or fails, so nothing between a check and the write can be overwritten.
    with open(path, "wb" if force else "xb") as f:
        f.write(data)


def export(folder: Path, force: bool = False) -> list[Path]:
    """Write every shipped file under ``folder``; return their paths.

    Nothing is written unless all of them can be: an existing one (without
    ``force``) stops the export before the first write.

    :raises FileExistsError: naming the first file that exists, when ``force`` is false
    :raises OSError: when ``folder`` or a file in it cannot be written
    """
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
    files = {folder / name: data for name, data in shipped_files().items()}
    if not force:
        for path in files:
            if os.path.lexists(path):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path))
    for path, data in files.items():
        write_new(path, data, force)
    return list(files)
