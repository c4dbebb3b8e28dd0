"""``mpipeline index build``: build the rag index ahead of a start.

The rag replicas build the index themselves when none matches the corpus,
but that costs seconds of every boot on a large corpus; built here first (on
a deploy, in CI), it lands in the same folder the replicas look in (the
corpus fingerprint names it), so they only memory-map it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TextIO

from mpipeline.ops.args import CONFIG_DEFAULTS


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    index = commands.add_parser("index", help="build the rag stage's retrieval index")
    actions = index.add_subparsers(title="index commands", required=True, metavar="ACTION")
    build = actions.add_parser(
        "build",
        help="index stages.rag.documents into stages.rag.index_dir",
        description="Chunk and index the documents folder of the config's [stages.rag] "
        "into a folder named by the corpus state under --out (default: index_dir, else "
        "rag-index in the run dir), where every rag replica memory-maps it.",
    )
    build.add_argument("--config", type=Path, default=None, metavar="FILE", help=CONFIG_DEFAULTS)
    build.add_argument("--out", type=Path, default=None, metavar="DIR", help="index folder")
    build.set_defaults(handler=_build)


def _build(args: argparse.Namespace) -> int:
    return main(args.config, args.out, out=sys.stdout, err=sys.stderr)


def main(config_file: Path | None, out_dir: Path | None, *, out: TextIO, err: TextIO) -> int:
    from mpipeline import config, rundir
    from mpipeline.errors import ConfigError, ExitCode
    from mpipeline.retrieval import index
    from mpipeline.retrieval.live import cache_dir

    path = config.locate(config_file)
    try:
        cfg = config.load(path)
    except ConfigError as exc:
        print(exc, file=err)
        return ExitCode.USAGE
    rag = cfg.stages.rag
    if rag.documents is None:
        print(f"{path or config.DEFAULTS}: stages.rag.documents is not set", file=err)
        return ExitCode.USAGE
    if out_dir is None and rag.index_dir is None:
        rundir.make(rundir.resolve_run_dir(cfg))  # 0700, as `mpipeline run` wants it
    cache = out_dir if out_dir is not None else cache_dir(rag, cfg)
    t0 = time.perf_counter()
    try:
        built, folder = index.ensure(
            Path(rag.documents).expanduser(), cache, rag.chunk_tokens, rag.chunk_overlap
        )
    except ConfigError as exc:
        print(exc, file=err)
        return ExitCode.USAGE
    took = time.perf_counter() - t0
    print(f"{len(built)} passages from {rag.documents} in {folder} ({took:.2f} s)", file=out)
    return ExitCode.OK
