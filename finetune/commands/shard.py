"""`finetune shard data.root=DIR out=SHARDS_DIR [shard_size=1000] [max_side=null]`: an ImageFolder (DIR/train/<class>/,
DIR/val/<class>/) written as webdataset tar shards, SHARDS_DIR/train-000000.tar ... and val-000000.tar ..., with
SHARDS_DIR/index.json (class names, per-split counts, the shard files). Train on them with data=webdataset (the
command prints the line). The same folder gives byte-identical shards; a run over an unchanged folder with the
same settings writes nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from omegaconf import MISSING

from finetune.base.errors import UserError
from finetune.commands.saved import parse_args
from finetune.data import shard_writer

log = logging.getLogger("finetune")
DATA_KEYS = ("root", "skip_bad")


@dataclass
class ShardArgs:
    # data.root=DIR (required): the ImageFolder to shard, DIR/train/<class>/* and DIR/val/<class>/*;
    # data.skip_bad=true leaves unreadable images out (counted in index.json) instead of failing
    data: Dict[str, Any] = field(default_factory=dict)
    out: str = MISSING  # the folder the shards and index.json are written to (created)
    shard_size: int = 1000  # images per shard file
    # re-encode an image whose longest side is larger as JPEG (quality 90), scaled down to this; null: every
    # image's bytes as stored
    max_side: Optional[int] = None
    progress: bool = True  # a progress bar on stderr


def run(argv: list[str]) -> dict:
    args = parse_args(ShardArgs, argv, "shard")
    unknown = sorted(set(args.data) - set(DATA_KEYS))
    if unknown:
        raise UserError(f"shard: unknown key 'data.{unknown[0]}'; shard takes data.root and data.skip_bad")
    root = args.data.get("root")
    if root is None or str(root).strip() == "":
        raise UserError("shard: data.root= is required (an ImageFolder: DIR/train/<class>/, DIR/val/<class>/)")
    index, written = shard_writer.write_shards(str(root), args.out, args.shard_size, args.max_side,
                                               bool(args.data.get("skip_bad", False)), bool(args.progress))
    counts = ", ".join(f"{split['count']} {name}" for name, split in index["splits"].items())
    files = sum(len(split["shards"]) for split in index["splits"].values())
    skipped = sum(split.get("skipped", 0) for split in index["splits"].values())
    if written:
        log.info("finetune: wrote %d shard(s) to %s: %s images, %d classes%s", files, args.out, counts,
                 len(index["classes"]), f" ({skipped} unreadable skipped)" if skipped else "")
    else:
        log.info("finetune: %s is up to date (%s images in %d shard(s)); nothing written", args.out, counts, files)
    log.info("finetune: train with: %s", shard_writer.train_command(args.out, index))
    return index
