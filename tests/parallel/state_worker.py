"""Under PP with 2 stages per rank: model/optimizer state names equal the unsplit model's and a
round trip restores the weights. Run under torchrun (2 ranks); each rank writes rank-<r>.json."""
import json
import sys

import torch

from launch.config import LaunchConfig
from launch.context import init_distributed, shutdown
from parallel.apply import parallelize
from parallel.dims import build_mesh
from parallel.state import load_state, state
from tests.parallel.layouts import overrides
from trainer.config import load_config
from trainer.model import Transformer
from trainer.optim import build_optimizer


def main() -> None:
    ctx = init_distributed(LaunchConfig(), "cpu")
    cfg = load_config("configs/tiny.toml", overrides("/tmp/unused", 1, [
        "--parallel.pp", "2", "--parallel.pp_schedule", "interleaved_1f1b", "--parallel.pp_virtual_stages", "2"]))
    dims = build_mesh(cfg.parallel, ctx)
    torch.manual_seed(0)
    unsplit = set(Transformer(cfg.model).state_dict())
    par = parallelize(Transformer(cfg.model), dims, cfg)
    opt = build_optimizer(par.model, cfg.optim, ctx.device)
    for p in par.model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    model_sd, optim_sd = state(par.model, opt)
    model_sd = {k: v.clone() for k, v in model_sd.items()}     # state dicts alias the parameters
    saved = [p.detach().clone() for p in par.model.parameters()]
    with torch.no_grad():
        for p in par.model.parameters():
            p.zero_()
    load_state(par.model, opt, model_sd, optim_sd)
    restored = all(torch.equal(a, p.detach()) for a, p in zip(saved, par.model.parameters()))
    optim_names = {k.split(".", 1)[1].rsplit(".", 1)[0] for k in optim_sd if k.startswith("state.")}
    with open(f"{sys.argv[1]}/rank-{ctx.rank}.json", "w") as f:
        json.dump({"model": sorted(model_sd), "optim": sorted(optim_names), "unsplit": sorted(unsplit),
                   "parts": len(par.model_parts), "restored": restored}, f)
    shutdown(ctx)


if __name__ == "__main__":
    main()
