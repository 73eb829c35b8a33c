"""One-GPU precision benchmark: tokens/s, MFU and peak memory of a Llama-shaped ~1B model trained
with bf16, bf16 + torch.compile, fp8 (torchao) and fp8 (transformer-engine), as a markdown table
with ratios against bf16 measured in the same invocation.

    python bench/gpu.py                      # all modes, ~1B model, under 8 minutes
    python bench/gpu.py --modes bf16,fp8-torchao --steps 30 --out bench/gpu.json
    python bench/gpu.py --quick              # CPU smoke test with a tiny model (what CI runs)
    python bench/gpu.py --device cpu --dry-run   # every GPU code path once, tiny model, on the CPU

`--dry-run` runs each path the GPU run takes once with a tiny model, so the first call on a GPU host
cannot die on a typo: bf16, compile (per block, as parallel/ does), the fused AdamW, fp8 conversion
through torchao (compiled), FSDP2 `fully_shard` on a one-rank process group (nccl on a GPU, gloo on
the CPU) with bf16 parameters, and transformers' LlamaForCausalLM at the same shape for the
side-by-side ratio. On a CPU the compiled modes use `aot_eager`: dynamo's trace and AOT autograd's
joint graph are what a typo breaks; inductor's C++ codegen costs minutes on 2 cores (Triton on a GPU).

Needs only torch and this repository (torchao / transformer-engine are used where installed):
the GPU host has no network. Each mode runs in its own subprocess with a time box, so a missing
package, an out-of-memory or a slow compile in one mode never stops the others, and peak memory
is per mode. The training step is the trainer's own (parallel.local_engine.LocalEngine: autocast bf16
over fp32 master weights, AdamW, grad clipping), on synthetic tokens; warmup steps (which include
compilation) are not timed. MFU is against the GPU's dense bf16 peak for every mode, so MFU ratios
equal throughput ratios (fp8 tensor cores peak at twice that).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODES = ("bf16", "bf16-compile", "fp8-torchao", "fp8-torchao-eager", "fp8-te", "bf16-fsdp", "hf-bf16")
# hf-bf16: transformers' LlamaForCausalLM, same shape and loop; its ratio is ours (bf16) over it
DEFAULT_MODES = "bf16,bf16-compile,fp8-torchao,fp8-te,hf-bf16"
DRY_RUN_MODES = "bf16,bf16-compile,fp8-torchao,bf16-fsdp,hf-bf16"
# configs/llama3-1b.toml's [model] (Llama 3.2 1B), written out so the bench needs no TOML reader
# (tests/precision/test_bench.py checks the two agree).
LLAMA_1B = dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_hidden=8192,
                rope_theta=500000.0, tie_embeddings=True, max_seq_len=8192)
TINY = dict(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_hidden=192, max_seq_len=64)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default=None, help=f"comma-separated, from {', '.join(MODES)} (default {DEFAULT_MODES})")
    p.add_argument("--steps", type=int, default=None, help="timed steps per mode (default 20; quick: 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first, compilation included (default 5; quick: 1)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 2048; quick: 32)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 4; quick: 2)")
    p.add_argument("--fp8-recipe-torchao", default="tensorwise", choices=("tensorwise", "rowwise"))
    p.add_argument("--fp8-recipe-te", default="delayed", choices=("delayed", "current", "mxfp8"))
    p.add_argument("--fp8-min-dim", type=int, default=None,
                   help="linears with a dim below this stay bf16 (default 1024, torchao's H100 guidance; quick: 0)")
    p.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget for all modes together (seconds)")
    p.add_argument("--mode-timeout-s", type=float, default=210.0, help="most seconds one mode may take")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="peak bf16 TFLOP/s for MFU (0 = look the GPU up)")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument("--quick", action="store_true", help="CPU smoke mode: tiny model, few steps, default modes bf16,fp8-torchao-eager,fp8-te")
    p.add_argument("--dry-run", action="store_true",
                   help=f"every GPU code path once with a tiny model (modes {DRY_RUN_MODES}); with --device cpu, CI's check")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cuda (default; the real benchmark) or cpu (only with --quick or --dry-run)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)       # internal: run one mode
    p.add_argument("--child-result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-deadline", type=float, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.dry_run:
        a.quick = a.quick or a.device == "cpu"    # a CPU dry run is a quick run of every mode
    quick = a.quick or a.dry_run
    # quick: no compile (minutes on a CPU); fp8-te shows its "what is missing" skip
    a.modes = a.modes or (DRY_RUN_MODES if a.dry_run else "bf16,fp8-torchao-eager,fp8-te" if quick else DEFAULT_MODES)
    a.steps = a.steps or (1 if a.dry_run else 3 if quick else 20)
    a.warmup = a.warmup if a.warmup is not None else (1 if quick else 5)
    a.seq_len = a.seq_len or (32 if quick else 2048)
    a.batch = a.batch or (2 if quick else 4)
    a.fp8_min_dim = a.fp8_min_dim if a.fp8_min_dim is not None else (0 if quick else 1024)
    a.mode_list = [m.strip() for m in a.modes.split(",") if m.strip()]
    unknown = [m for m in a.mode_list if m not in MODES]
    if unknown:
        p.error(f"--modes: unknown {', '.join(unknown)}; choose from {', '.join(MODES)}")
    if a.device == "cpu" and not quick:
        p.error("--device cpu: only with --quick or --dry-run (the benchmark proper needs a GPU)")
    if a.steps < 1 or a.warmup < 0 or a.seq_len < 1 or a.batch < 1:
        p.error("--steps, --seq-len and --batch must be >= 1 and --warmup >= 0")
    return a


# ---- one mode (runs in a child process) ------------------------------------------------------------

class Skip(Exception):
    """The mode cannot run here (a package or the hardware is missing)."""


def bench_config(args):
    """The model config of this invocation: the tiny shape for --quick / --dry-run, else Llama 1B."""
    from core.model_config import ModelConfig
    shape = dict(TINY if args.quick or args.dry_run else LLAMA_1B)
    shape["max_seq_len"] = max(shape["max_seq_len"], args.seq_len)
    return ModelConfig(**shape)


def build_mode(mode: str, args, device):
    import torch
    from trainer.model import Transformer
    from parallel.precision import convert_for_training
    from core.precision_config import PrecisionConfig

    cfg = bench_config(args)
    torch.manual_seed(0)
    with device:
        model = Transformer(cfg)
    dtype = "fp8" if mode.startswith("fp8") else "bf16"
    if mode.startswith("fp8-torchao"):
        try:
            import torchao  # noqa: F401
        except ImportError as e:
            raise Skip(f"torchao is not installed ({e})") from None
        precision = PrecisionConfig(dtype="fp8", fp8_backend="torchao", fp8_recipe=args.fp8_recipe_torchao,
                                    fp8_min_dim=args.fp8_min_dim)
    elif mode == "fp8-te":
        precision = PrecisionConfig(dtype="fp8", fp8_backend="te", fp8_recipe=args.fp8_recipe_te,
                                    fp8_min_dim=args.fp8_min_dim)
    else:
        precision = PrecisionConfig(dtype="bf16")
    precision.validate()
    try:
        model = convert_for_training(model, precision)
    except RuntimeError as e:
        if "needs" in str(e):             # the clear "what is missing" errors of parallel.precision
            raise Skip(str(e)) from None
        raise
    if mode in ("bf16-compile", "fp8-torchao"):
        # per block, as parallel/ compiles; on a CPU dry run without inductor (see the docstring)
        backend = "aot_eager" if device.type == "cpu" else "inductor"
        for block in model.layers.values():
            block.compile(backend=backend)
    return model, cfg, dtype


def build_hf(args, device):
    """transformers' Llama at the bench's shape with our initial weights (trainer/hf_llama.py's map)."""
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise Skip(f"transformers is not installed ({e})") from None
    import torch
    from trainer.model import Transformer
    from bench.vs_hf import hf_model
    cfg = bench_config(args)
    torch.manual_seed(0)
    with device:
        ours = Transformer(cfg)
        return hf_model(ours, cfg), cfg


class HFLoop:
    """The plain loop a transformers user writes, behind LocalEngine's train_step (bench/vs_hf.py)."""

    def __init__(self, model, optimizer, scheduler, grad_clip: float):
        self.model, self.optimizer, self.scheduler, self.grad_clip = model, optimizer, scheduler, grad_clip

    def train_step(self, batches):
        from bench.vs_hf import hf_step
        (x, y), = batches
        return types.SimpleNamespace(loss=hf_step(self.model, self.optimizer, self.scheduler, x, y, self.grad_clip, "bf16"))


def shard_one_rank(model, cfg, device) -> None:
    """FSDP2 on a one-rank process group (nccl on a GPU, gloo on the CPU) through the trainer's own
    apply_fsdp, with bf16 parameters (bf16_mode = params): the sharding, all-gather and
    reduce-scatter code runs, even though one rank has nothing to exchange."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from core.parallel_config import ParallelConfig
    from core.precision_config import PrecisionConfig
    from parallel.data_parallel import apply_fsdp
    from trainer.model_plan import parallel_plan
    store = tempfile.NamedTemporaryFile(prefix="gpu-bench-pg-", delete=False).name
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{store}",
                            rank=0, world_size=1)
    mesh = init_device_mesh(device.type, (1,), mesh_dim_names=("dp_shard",))
    # apply_fsdp reads only the shard mesh (and whether experts are split) from the layout's dims
    apply_fsdp(model, parallel_plan(cfg), types.SimpleNamespace(fsdp_mesh=mesh, ep_enabled=False), ParallelConfig(),
               PrecisionConfig(dtype="bf16", bf16_mode="params"))


def run_mode(mode: str, args) -> dict:
    import torch
    from parallel.local_engine import LocalEngine
    from trainer.metrics import peak_flops, peak_memory_gib
    from parallel.precision import fp8_module_names

    cuda = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if mode == "hf-bf16":
        model, cfg = build_hf(args, device)
    else:
        model, cfg, dtype = build_mode(mode, args, device)
    if mode == "bf16-fsdp":
        shard_one_rank(model, cfg, device)
    # the fused AdamW kernel exists for CUDA and (torch >= 2.4) the CPU: the path the GPU run takes
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if mode == "hf-bf16":
        engine = HFLoop(model, optimizer, scheduler, grad_clip=1.0)
    else:
        engine = LocalEngine(model, optimizer, scheduler, device, dtype, grad_clip=1.0,
                             bf16_mode="params" if mode == "bf16-fsdp" else "autocast")
    g = torch.Generator(device=device).manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), device=device, generator=g) for _ in range(2)]
    batches = [(b[:, :-1], b[:, 1:]) for b in batches]

    def sync():
        if cuda:
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    loss = torch.tensor(float("nan"))
    for i in range(args.warmup):
        loss = engine.train_step([batches[i % 2]]).loss
    sync()
    warmup_s = time.perf_counter() - t0
    deadline = args.child_deadline or float("inf")
    times = []
    for i in range(args.steps):
        if times and time.time() + max(times) > deadline:
            break                          # time box: report the steps measured so far
        t = time.perf_counter()
        loss = engine.train_step([batches[i % 2]]).loss   # left on the device: sync() waits for it
        sync()
        times.append(time.perf_counter() - t)
    step_s = sorted(times)[len(times) // 2]          # median: robust to a stray slow step
    tokens_per_s = args.batch * args.seq_len / step_s
    try:
        peak = peak_flops(device, "bf16", args.peak_tflops, 1.0, lambda: 1e12) if cuda or args.peak_tflops else None
    except RuntimeError:
        peak = None                        # unknown GPU and no --peak-tflops: no MFU
    flops = cfg.flops_per_token(args.seq_len)
    return {"mode": mode, "status": "ok", "tokens_per_s": tokens_per_s, "step_s": step_s, "steps": len(times),
            "warmup_s": round(warmup_s, 2), "mfu": tokens_per_s * flops / peak if peak else None,
            "peak_mem_gib": peak_memory_gib(device), "final_loss": float(loss),
            "fp8_layers": len(fp8_module_names(model))} | finish_mode(mode)


def finish_mode(mode: str) -> dict:
    """Leave bf16-fsdp's process group as torch wants it left (barrier, then destroy)."""
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier(), dist.destroy_process_group()
    return {}


def child_main(args) -> None:
    try:
        result = run_mode(args.child, args)
    except Skip as e:
        result = {"mode": args.child, "status": f"skipped: {e}"}
    Path(args.child_result).write_text(json.dumps(result))


# ---- the driver --------------------------------------------------------------------------------------

def child_command(mode: str, args, result: Path, deadline: float) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--child-result", str(result),
           "--child-deadline", str(deadline), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--seq-len", str(args.seq_len), "--batch", str(args.batch), "--fp8-min-dim", str(args.fp8_min_dim),
           "--fp8-recipe-torchao", args.fp8_recipe_torchao, "--fp8-recipe-te", args.fp8_recipe_te,
           "--peak-tflops", str(args.peak_tflops)]
    return cmd + (["--quick"] if args.quick else []) + (["--dry-run"] if args.dry_run else []) + ["--device", args.device]


def last_error_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip() and not ln.startswith(" ")]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errors or lines or ["no output"])[-1][:300]


def run_child(cmd: list[str], env: dict, log_file: Path, timeout: float) -> bool:
    """Run one mode; True if it had to be killed. Output goes to a file and the child gets its own
    process group: killing it then also ends compile workers it started, which would otherwise
    keep a pipe open and hang the wait."""
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
            return False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True


def run_all(args, start: float) -> list[dict]:
    """Every mode in its own process, within args.budget_s counted from `start`."""
    results = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as tmp:
        for i, mode in enumerate(args.mode_list):
            left_after = len(args.mode_list) - i - 1
            remaining = args.budget_s - (time.time() - start)
            # leave every later mode at least 30 s to report something
            timeout = min(args.mode_timeout_s, remaining - 30 * left_after)
            if timeout < 20:
                results.append({"mode": mode, "status": "skipped: out of the time budget (--budget-s)"})
                continue
            result_file = Path(tmp) / f"{mode}.json"
            # the child stops timing 15 s before its hard limit, so a slow mode still reports
            deadline = time.time() + timeout - 15
            t = time.time()
            print(f"[bench] {mode}: up to {timeout:.0f} s ...", file=sys.stderr, flush=True)
            log_file = Path(tmp) / f"{mode}.log"
            if run_child(child_command(mode, args, result_file, deadline), env, log_file, timeout):
                result = {"mode": mode, "status": f"failed: timed out after {timeout:.0f} s (--mode-timeout-s)"}
            elif result_file.exists():
                result = json.loads(result_file.read_text())
            else:
                result = {"mode": mode, "status": f"failed: {last_error_line(log_file.read_text(errors='replace'))}"}
            result["wall_s"] = round(time.time() - t, 1)
            print(f"[bench] {mode}: {result['status']} in {result['wall_s']} s", file=sys.stderr, flush=True)
            results.append(result)
    for base in ("bf16", "bf16-compile", "hf-bf16"):
        ref = next((r for r in results if r["mode"] == base and r["status"] == "ok"), None)
        for r in results:
            if ref and r["status"] == "ok":
                r[f"x_{base}"] = r["tokens_per_s"] / ref["tokens_per_s"]
    return results


def fmt(value, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def table(results: list[dict]) -> str:
    rows = ["| mode | tokens/s | MFU | peak mem (GiB) | x bf16 | x bf16-compile | x hf-bf16 | loss | status |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        ok = r["status"] == "ok"
        rows.append("| " + " | ".join([
            r["mode"], fmt(r.get("tokens_per_s") if ok else None, "{:,.0f}"),
            fmt(r.get("mfu") if ok else None, "{:.1%}"), fmt(r.get("peak_mem_gib") if ok else None, "{:.1f}"),
            fmt(r.get("x_bf16"), "{:.2f}"), fmt(r.get("x_bf16-compile"), "{:.2f}"), fmt(r.get("x_hf-bf16"), "{:.2f}"),
            fmt(r.get("final_loss") if ok else None, "{:.3f}"),
            r["status"] if not ok else f"ok ({r['steps']} steps, warmup {r['warmup_s']} s, {r['fp8_layers']} fp8 layers)",
        ]) + " |")
    return "\n".join(rows)


def environment(args) -> dict:
    import torch
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.quick else "cpu"}
    for name in ("torchao", "transformer_engine"):
        try:
            module = __import__(name)
            env[name] = getattr(module, "__version__", "installed")
        except Exception as e:  # TE raises more than ImportError without CUDA libraries
            env[name] = f"absent ({type(e).__name__})"
    return env


def main(argv=None) -> int:
    start = time.time()
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return 0
    import torch
    if not args.quick and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device visible to torch; run it on a GPU host, or pass --quick for the CPU smoke test",
              file=sys.stderr)
        return 2
    env = environment(args)
    results = run_all(args, start)
    shape = TINY if args.quick or args.dry_run else LLAMA_1B
    head = (f"{env['device']}, torch {env['torch']}, torchao {env['torchao']}, transformer_engine {env['transformer_engine']}; "
            f"model dim {shape['dim']} x {shape['n_layers']} layers, vocab {shape['vocab_size']}; "
            f"batch {args.batch} x seq {args.seq_len}; {args.steps} timed steps after {args.warmup} warmup; "
            "MFU against the dense bf16 peak")
    print(head)
    print()
    print(table(results))
    if args.out:
        Path(args.out).write_text(json.dumps({"environment": env, "model": shape, "batch": args.batch,
                                              "seq_len": args.seq_len, "steps": args.steps, "warmup": args.warmup,
                                              "results": results}, indent=2) + "\n")
    return 0 if any(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
