"""Build native/ringcore.c into an importable extension with plain gcc (no setuptools).

The C ring core is a study for issue 16, item 3 (``bench/ring_native.py``,
``bench/RESULTS.md``): it is built on demand into a scratch folder, never into
the package, so nothing imports it by accident. Usage:
``python native/build.py OUTDIR [--xxh3-include DIR]``; prints the path of the
``.so``. With ``--xxh3-include`` (a folder holding ``xxhash.h``) the checksum
is inlined instead of calling the xxhash package.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

SOURCE = Path(__file__).with_name("ringcore.c")
MODULE = "ringcore"


def python_header() -> Path:
    """Python.h of the running interpreter; missing on a bare install without dev headers."""
    return Path(sysconfig.get_paths()["include"]) / "Python.h"


def can_build() -> str | None:
    """None when gcc and Python.h are here; else what is missing, in words."""
    if shutil.which("gcc") is None:
        return "gcc is not installed"
    if not python_header().is_file():
        return f"{python_header()} is missing (install the Python dev headers)"
    return None


def build(outdir: Path, *, xxh3_include: Path | None = None, name: str = MODULE) -> Path:
    """Compile the extension into ``outdir``; return the ``.so`` path.

    ``name`` other than ``ringcore`` builds the same code under another module
    name (PyInit_<name>), so two variants can be imported side by side.
    """
    outdir.mkdir(parents=True, exist_ok=True)
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    out = outdir / f"{name}{suffix}"
    cmd = [
        "gcc",
        "-O2",
        "-shared",
        "-fPIC",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-Wno-missing-field-initializers",
        f"-I{sysconfig.get_paths()['include']}",
        f"-DPyInit_ringcore=PyInit_{name}",
        f'-DRINGCORE_NAME="{name}"',
    ]
    if xxh3_include is not None:
        cmd += ["-DRINGCORE_XXH3", f"-I{xxh3_include}"]
    cmd += [str(SOURCE), "-o", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--xxh3-include", type=Path, default=None)
    ap.add_argument("--name", default=MODULE)
    args = ap.parse_args(argv)
    missing = can_build()
    if missing:
        sys.stderr.write(f"cannot build: {missing}\n")
        return 1
    try:
        so = build(args.outdir, xxh3_include=args.xxh3_include, name=args.name)
    except subprocess.CalledProcessError as exc:
        sys.stderr.write(exc.stderr)
        return 1
    sys.stdout.write(f"{so}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
