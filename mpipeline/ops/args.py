"""Command-line arguments that several command families share.

Kept apart from the commands so that ``mpipeline --help`` and a usage error
import nothing but argparse: every handler loads the runtime itself when it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# The config file a command reads when given none (relative to the working directory),
# and the variable that names one instead: the same as mpipeline.config's DEFAULT_PATH
# and CONFIG_ENV, which the handlers import when they run.
DEFAULT_CONFIG = Path("config/pipeline.toml")
CONFIG_ENV = "MPIPELINE_CONFIG"
CONFIG_DEFAULTS = (
    f"default: ${CONFIG_ENV}, else {DEFAULT_CONFIG} if it exists, else the built-in defaults"
)


def add_where(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--run-dir", type=Path, default=None, metavar="DIR")
    where.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help=f"find the run dir from this config ({CONFIG_DEFAULTS})",
    )


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {text!r}")
    return value


def port_number(text: str) -> int:
    """A TCP port for a listener: 1-65535, or 0 for any free one."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0-65535 (0: any free port): {text!r}")
    return value
