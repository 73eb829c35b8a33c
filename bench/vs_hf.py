"""Our training step against Hugging Face's LlamaForCausalLM, and both against the machine's matmul limit.

One process, the same Llama shape, the same initial weights (ours exported to HF names), the same
batches, fp32 or bf16 autocast. Ours is `parallel.local_engine.LocalEngine` (what `meshformer train`
runs per step), eager and with each block compiled (`--parallel.compile true`, parallel/
activation_checkpoint.apply_compile); Hugging Face's is the plain loop a user would write
(`model(x, labels=y).loss`, backward, clip, AdamW, LR schedule). They alternate in short blocks so
machine noise hits all alike; each ratio printed is the median over the blocks (>1: ours is faster).

The roofline column: every GEMM of a training step (forward, and the two backward GEMMs of each
linear layer, attention's score/value products, the output head) is timed as a bare `torch.mm` /
`torch.bmm` at its own shape and precision, in the same run; their sum over the step's measured time
is the share of the machine's matmul limit that the step reaches (1.0 = nothing but matmuls at the
speed the BLAS gives those shapes).

    python bench/vs_hf.py                       # 4 layers, d 256, 4 heads, ffn 688, seq 256, batch 8
    python bench/vs_hf.py --dtypes fp32 --blocks 4 --steps-per-block 3 --dim 64 --seq 64 --no-compile  # quick
    (TORCHINDUCTOR_CACHE_DIR=DIR keeps compiled kernels between runs: compiling takes minutes on 2 cores)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.run_config import load_config  # noqa: E402
from parallel.activation_checkpoint import apply_compile  # noqa: E402
from parallel.local_engine import LocalEngine  # noqa: E402
from trainer.hf_llama import hf_config, to_hf  # noqa: E402
from trainer.model import Transformer  # noqa: E402
from trainer.optim import build_optimizer, build_scheduler  # noqa: E402
from trainer.roofline import BareGemms, gemm_shapes, shape_flops  # noqa: E402

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16}


def hf_model(ours: Transformer, mc):
    import transformers
    cfg = transformers.LlamaConfig(**{k: v for k, v in hf_config(mc).items() if k not in ("architectures", "model_type")})
    cfg._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(to_hf(ours.state_dict(), mc), strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return model


def hf_step(model, opt, sched, x, y, clip, dtype):
    opt.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=AUTOCAST[dtype], enabled=AUTOCAST[dtype] is not None):
        loss = model(input_ids=x, labels=None).logits.float()
    loss = torch.nn.functional.cross_entropy(loss.flatten(0, 1), y.flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=True)
    opt.step()
    sched.step()
    return loss.detach()


def our_engine(cfg, dtype: str, steps: int, compiled: bool) -> LocalEngine:
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    if compiled:
        apply_compile(model, "layers")
    dev = torch.device("cpu")
    opt = build_optimizer(model, cfg.optim, dev)
    return LocalEngine(model, opt, build_scheduler(opt, cfg.optim, steps), dev, dtype, cfg.optim.grad_clip)


def run(cfg, dtype: str, blocks: int, per_block: int, warmup: int, compiled: bool) -> dict:
    mc, B, T = cfg.model, cfg.train.batch_size, cfg.train.seq_len
    steps = warmup + blocks * per_block + 1
    engines = {"ours": our_engine(cfg, dtype, steps, False)}
    if compiled:
        engines["ours_compiled"] = our_engine(cfg, dtype, steps, True)
    theirs = hf_model(engines["ours"].model, mc)
    h_opt = torch.optim.AdamW(theirs.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                              weight_decay=cfg.optim.weight_decay, fused=False, foreach=True)
    h_sched = build_scheduler(h_opt, cfg.optim, steps)
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, mc.vocab_size, (4, B, T + 1), generator=g)
    batches = [(d[:, :-1].contiguous(), d[:, 1:].contiguous()) for d in data]

    def step(who, x, y):
        if who == "hf":
            return hf_step(theirs, h_opt, h_sched, x, y, cfg.optim.grad_clip, dtype).item()
        return engines[who].train_step([(x, y)]).loss.item()  # done when its loss is (as for HF's)

    names = list(engines) + ["hf"]
    first = {who: step(who, *batches[0]) for who in names}
    for i in range(1, warmup):
        for who in names:
            step(who, *batches[i % 4])
    gemms = BareGemms(gemm_shapes(mc, B, T), AUTOCAST[dtype] or torch.float32)
    times = {who: [] for who in names + ["gemm"]}
    for block in range(blocks):
        # the bare matmuls are timed in every block too, beside the steps, so load on the machine
        # hits the roofline's denominator as it hits the steps
        times["gemm"].append(min(gemms() for _ in range(per_block)))
        for who in (names if block % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            for s in range(per_block):
                step(who, *batches[s % 4])
            times[who].append((time.perf_counter() - t0) / per_block)
    share = {who: statistics.median(g / t for g, t in zip(times["gemm"], times[who])) for who in names}
    ratio = {who: statistics.median(h / o for o, h in zip(times[who], times["hf"])) for who in engines}
    return {"dtype": dtype, "first_loss": first, "tokens": B * T, "share": share, "ratio": ratio,
            "step_s": {k: statistics.median(v) for k, v in times.items()},
            "gflops": shape_flops(gemm_shapes(mc, B, T)) / 1e9}


def shape_config(args):
    """configs/tiny.toml (byte tokens, vocab 320) at the shape of the command line's arguments."""
    return load_config(str(Path(__file__).resolve().parents[1] / "configs/tiny.toml"), [
        "--model.n_layers", str(args.layers), "--model.dim", str(args.dim), "--model.n_heads", str(args.heads),
        "--model.n_kv_heads", str(args.heads), "--model.ffn_hidden", str(args.ffn), "--model.max_seq_len",
        str(max(args.seq, 512)), "--train.seq_len", str(args.seq), "--train.batch_size", str(args.batch)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16 (default: fp32,bf16)")
    p.add_argument("--layers", type=int, default=4, help="default: 4")
    p.add_argument("--dim", type=int, default=256, help="default: 256")
    p.add_argument("--heads", type=int, default=4, help="default: 4")
    p.add_argument("--ffn", type=int, default=688, help="default: 688")
    p.add_argument("--seq", type=int, default=256, help="default: 256")
    p.add_argument("--batch", type=int, default=8, help="default: 8")
    p.add_argument("--blocks", type=int, default=8, help="alternating blocks per side (default: 8)")
    p.add_argument("--steps-per-block", type=int, default=4, help="default: 4")
    p.add_argument("--warmup", type=int, default=3, help="default: 3 (compilation happens in the first)")
    p.add_argument("--no-compile", action="store_true", help="leave out our compiled step (compiling takes minutes here)")
    args = p.parse_args(argv)
    cfg = shape_config(args)
    print(f"shape: {args.layers} layers, d {args.dim}, {args.heads} heads, ffn {args.ffn}, seq {args.seq}, "
          f"batch {args.batch}, vocab {cfg.model.vocab_size}; threads {torch.get_num_threads()}")
    for dtype in args.dtypes.split(","):
        r = run(cfg, dtype, args.blocks, args.steps_per_block, args.warmup, not args.no_compile)
        s = r["step_s"]
        print(f"{dtype}: first loss " + " ".join(f"{who} {v:.5f}" for who, v in r["first_loss"].items())
              + f" | bare GEMMs {r['gflops'] / s['gemm']:.3g} GFLOP/s")
        for who in r["first_loss"]:
            vs = f"ratio {who}/hf {r['ratio'][who]:.3f} | " if who != "hf" else ""
            print(f"  {who:14s} tokens/s {r['tokens'] / s[who]:8,.0f} | {vs}matmul roofline share {r['share'][who]:.0%} "
                  f"({r['gflops'] / s[who]:.3g} GFLOP/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
