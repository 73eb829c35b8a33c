"""Run under torchrun with 2 gloo ranks: fp8 (torchao) training under FSDP x2 and TP x2 against a
single-process fp8 run of the same model and global batches. Writes one JSON line per check to
the file named by argv[1] (rank 0)."""
from __future__ import annotations

import json
import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from parallel.local_engine import cross_entropy
from trainer.model import Transformer
from core.model_config import ModelConfig
from parallel.precision import convert_for_training, fp8_module_names, fsdp_mixed_precision, post_optimizer_hook
from core.precision_config import PrecisionConfig

warnings.filterwarnings("ignore")
STEPS, B, T, LR = 8, 4, 32, 1e-2
MODEL = ModelConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, max_seq_len=T)


def batches(world: int):
    """Two global batches, cycled, so the loss falls far enough for a wrong update to show."""
    g = torch.Generator().manual_seed(0)
    two = [torch.randint(0, MODEL.vocab_size, (B * world, T + 1), generator=g) for _ in range(2)]
    return [two[i % 2] for i in range(STEPS)]


def build():
    torch.manual_seed(0)
    return Transformer(MODEL)


def run(model, data, rows=slice(None), autocast=True, hook=False):
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for b in data:
        b = b[rows]
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            loss = cross_entropy(model(b[:, :-1]), b[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        if hook:
            post_optimizer_hook([model])
        if dist.is_initialized():
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        losses.append(loss.item())
    return losses


def fsdp(cfg: PrecisionConfig, rank: int, world: int):
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (world,))
    model = convert_for_training(build(), cfg)
    mp = fsdp_mixed_precision(cfg)
    kw = {"mp_policy": mp} if mp is not None else {}
    for block in model.layers.values():
        fully_shard(block, mesh=mesh, **kw)
    fully_shard(model, mesh=mesh, **kw)
    losses = run(model, batches(world), slice(rank * B, (rank + 1) * B), autocast=cfg.bf16_mode == "autocast", hook=True)
    # what a checkpoint would save: full-precision, unsharded names and shapes
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    dtypes = sorted({str(v.dtype) for v in sd.values()})
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor
    fp8_gather = sum(isinstance(getattr(m.weight, "_local_tensor", None), WeightWithDynamicFloat8CastTensor)
                     for m in model.modules() if hasattr(m, "weight"))
    return losses, fp8_module_names(model), dtypes, fp8_gather


def tp(cfg: PrecisionConfig, world: int):
    """Torch's parallelize_module with the plan parallel/ applies (no sequence parallel), then the
    fp8 conversion on the sharded layers."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    mesh = init_device_mesh("cpu", (world,))
    model = build()
    plan = {"attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(), "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(), "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w3": ColwiseParallel(), "feed_forward.w2": RowwiseParallel()}
    for block in model.layers.values():
        parallelize_module(block, mesh, plan)
    model = convert_for_training(model, cfg, tp_mesh=mesh)   # after TP, as parallelize() orders it
    return run(model, batches(world)), fp8_module_names(model)   # TP peers see the whole batch


def main():
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    results = []
    ref_model = convert_for_training(build(), PrecisionConfig(dtype="fp8"))
    ref = run_single(ref_model, world)
    results.append({"check": "single", "losses": ref})
    for name, cfg in [("fsdp", PrecisionConfig(dtype="fp8")),
                      ("fsdp_fp8_all_gather", PrecisionConfig(dtype="fp8", fp8_fsdp_all_gather=True)),
                      ("fsdp_params_mode", PrecisionConfig(dtype="fp8", bf16_mode="params"))]:
        losses, names, dtypes, fp8_gather = fsdp(cfg, rank, world)
        results.append({"check": name, "losses": losses, "fp8_modules": names, "state_dtypes": dtypes,
                        "fp8_all_gather_weights": fp8_gather})
    losses, names = tp(PrecisionConfig(dtype="fp8"), world)
    results.append({"check": "tp", "losses": losses, "fp8_modules": names})
    if rank == 0:
        with open(out, "w") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    dist.barrier()
    dist.destroy_process_group()


def run_single(model, world):
    """The reference: one process, the whole global batch (what FSDP x world sees together)."""
    losses = []   # not run(): that averages over ranks; here every rank computes the same thing
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    for b in batches(world):
        with torch.autocast("cpu", torch.bfloat16):
            loss = cross_entropy(model(b[:, :-1]), b[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
