"""Shard tiny models for real (torchrun, 4 ranks, gloo) and record each rank's model-state bytes.

Run by test_memory_exact.py: `torchrun --nproc_per_node 4 tests/planner/memory_worker.py OUTDIR`.
The sharding uses torch's own APIs (fully_shard, parallelize_module, and deleting the layers a
pipeline stage does not hold), not meshformer's parallel/ package, so the planner is checked
against torch rather than against another part of this project.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from tests.planner.memory_cases import CASES
from trainer.model import Transformer


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _bytes(tensors) -> int:
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors)


def measure(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    params = list(model.parameters())
    states = [v for p in params for v in opt.state[p].values() if torch.is_tensor(v)]
    return {"params": _bytes(params), "grads": _bytes(p.grad for p in params if p.grad is not None),
            "optimizer": _bytes(states), "tensors": len(params),
            "elements": sum(_local(p).numel() for p in params)}


def apply_tp(model: Transformer, tp_mesh) -> None:
    parallelize_module(model, tp_mesh, {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate()),
        "output": ColwiseParallel(output_layouts=Replicate()),
    })
    plan = {"attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(), "attention.wo": RowwiseParallel(),
            "feed_forward.w1": ColwiseParallel(), "feed_forward.w2": RowwiseParallel()}
    if model.cfg.activation == "swiglu":
        plan["feed_forward.w3"] = ColwiseParallel()
    for layer in model.layers.values():
        parallelize_module(layer, tp_mesh, plan)


def keep_stage(model: Transformer, stage: int, pp: int) -> None:
    """An even, contiguous split as torch's pipeline splitting makes it (layers per stage = L / pp)."""
    per = model.cfg.n_layers // pp
    keep = {str(i) for i in range(stage * per, (stage + 1) * per)}
    for name in list(model.layers.keys()):
        if name not in keep:
            del model.layers[name]
    if stage != 0:
        model.tok_embeddings = None
        model.pos_embeddings = None
    if stage != pp - 1:
        model.norm = None
        model.output = None


def run_case(case: dict, rank: int, world: int) -> dict:
    cfg, tp, pp = case["model"], case["tp"], case["pp"]
    dp = world // (tp * pp)
    mesh = init_device_mesh("cpu", (pp, dp, tp), mesh_dim_names=("pp", "dp", "tp"))
    torch.manual_seed(0)
    model = Transformer(cfg)
    stage = mesh["pp"].get_local_rank()
    if pp > 1:
        keep_stage(model, stage, pp)
    if tp > 1:
        apply_tp(model, mesh["tp"])
    for layer in model.layers.values():
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    b, s = 2, case["seq_len"]
    g = torch.Generator().manual_seed(1)
    if model.tok_embeddings is not None:
        x = torch.randint(0, cfg.vocab_size, (b, s), generator=g)
    else:
        x = torch.randn(b, s, cfg.dim, generator=g)
    out = model(x)
    out.float().pow(2).mean().backward()
    opt.step()
    return {"stage": stage, **measure(model, opt)}


def main(outdir: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {name: run_case(case, rank, world) for name, case in CASES.items()}
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
