"""Count the collectives of one tensor-parallel Transformer block (forward and backward) with
torch's CommDebugMode. Run under torchrun with 2 ranks; rank 0 writes the counts as JSON."""
from __future__ import annotations

import json
import sys

import torch
from torch.distributed.device_mesh import init_device_mesh

from core.launch_config import LaunchConfig
from launch.context import init_distributed, shutdown
from parallel.tensor import apply_tensor_parallel, tp_collective_counts
from trainer.model import Transformer
from core.model_config import ModelConfig
from trainer.model_plan import parallel_plan


def main() -> None:
    ctx = init_distributed(LaunchConfig(), "cpu")
    mesh = init_device_mesh("cpu", (ctx.world_size,), mesh_dim_names=("tp",))
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_hidden=64, max_seq_len=64)
    results = {}
    for sp in (True, False):
        torch.manual_seed(0)
        model = Transformer(cfg)
        model.tok_embeddings, model.norm, model.output = None, None, None   # just the block
        apply_tensor_parallel(model, mesh, parallel_plan(cfg), sp=sp)
        block = model.layers["0"]
        seq = 16
        x = torch.randn(2, seq, cfg.dim, requires_grad=True)
        if sp:   # the block sits inside the sequence-parallel region: it gets its sequence shard
            x = x.chunk(ctx.world_size, dim=1)[ctx.rank].detach().requires_grad_()
        # only the block's own plan: drop the stage-boundary hooks the first/last block got
        block._forward_pre_hooks.clear()
        block._forward_hooks.clear()
        results["sp" if sp else "no_sp"] = tp_collective_counts(block, x, model.rope[:seq])
    if ctx.is_main:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f)
    shutdown(ctx)


if __name__ == "__main__":
    main()
