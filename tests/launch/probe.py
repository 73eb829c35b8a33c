"""A process that joins the job the way the trainer does (launch.context.init_distributed), sums
its rank over the process group, and prints one JSON line: what each launcher test checks."""
from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from core.launch_config import LaunchConfig
from launch.context import init_distributed, shutdown


def main(argv: list[str]) -> int:
    cfg = LaunchConfig(**json.loads(argv[0])) if argv else LaunchConfig()
    ctx = init_distributed(cfg, "cpu")
    total = torch.tensor([float(ctx.rank)])
    if ctx.distributed:
        dist.all_reduce(total)
    print("PROBE " + json.dumps({"rank": ctx.rank, "world": ctx.world_size, "local_rank": ctx.local_rank,
                                 "node_rank": ctx.node_rank, "launcher": ctx.launcher, "backend": ctx.backend,
                                 "rank_sum": total.item()}), flush=True)
    shutdown(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
