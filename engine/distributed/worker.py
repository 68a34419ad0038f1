"""Entry point of tensor-parallel ranks 1..N-1: `python -m loraplane.engine.distributed.worker`.

Rank 0 starts it with RANK, WORLD_SIZE, MASTER_PORT and LORAPLANE_TP_PARENT in the environment
and the engine options as JSON on the command line.
"""

from __future__ import annotations

import logging
import os
import sys

from loraplane.engine.distributed.engine import TPOptions, build_rank
from loraplane.engine.distributed.group import watch_parent

log = logging.getLogger("loraplane.engine.distributed.worker")


def main(argv: list[str]) -> int:
    """Build this rank's engine and follow rank 0's steps until it says shut down."""
    rank = int(os.environ["RANK"])
    if len(argv) != 1 or not 1 <= rank < int(os.environ["WORLD_SIZE"]):
        raise SystemExit("usage: RANK=... WORLD_SIZE=... MASTER_PORT=... "
                         "python -m loraplane.engine.distributed.worker OPTIONS_JSON")
    opts = TPOptions.from_json(argv[0])
    logging.basicConfig(level=opts.log_level,
                        format=f"%(asctime)s %(levelname)s tp-rank{rank} %(name)s: %(message)s")
    watch_parent(int(os.environ["LORAPLANE_TP_PARENT"]))
    engine = build_rank(opts, rank, int(os.environ["MASTER_PORT"]))
    try:
        engine.follow_rank0()
    except Exception:
        log.exception("tensor-parallel rank %d failed", rank)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
