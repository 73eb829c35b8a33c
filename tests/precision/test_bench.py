"""bench/gpu.py: its CPU smoke mode runs every path except the GPU kernels."""
import json
import math
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import gpu  # noqa: E402


def bench(*args, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, str(ROOT / "bench/gpu.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_bench_model_is_the_llama3_1b_config():
    model = tomllib.loads((ROOT / "configs/llama3-1b.toml").read_text())["model"]
    assert gpu.LLAMA_1B == model
    from core.model_config import ModelConfig
    assert 1.2e9 < ModelConfig(**gpu.LLAMA_1B).num_params() < 1.3e9


def test_bad_modes_are_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit):
        gpu.parse_args(["--modes", "bf16,fp16"])
    assert "unknown fp16; choose from bf16, bf16-compile" in capsys.readouterr().err


def test_without_a_gpu_it_says_so_unless_quick():
    r = bench("--modes", "bf16", timeout=120)
    assert r.returncode == 2 and "no CUDA device" in r.stderr and "--quick" in r.stderr


@pytest.mark.slow
def test_quick_mode_measures_each_mode_and_skips_te_with_a_reason(tmp_path):
    out = tmp_path / "bench.json"
    r = bench("--quick", "--steps", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    results = {row["mode"]: row for row in json.loads(out.read_text())["results"]}
    assert list(results) == ["bf16", "fp8-torchao-eager", "fp8-te"]
    bf16, fp8 = results["bf16"], results["fp8-torchao-eager"]
    assert bf16["status"] == "ok" and fp8["status"] == "ok"
    assert bf16["tokens_per_s"] > 0 and bf16["x_bf16"] == 1.0 and bf16["steps"] == 2
    assert fp8["fp8_layers"] == 2 * 7 and bf16["fp8_layers"] == 0        # every block linear, not the head
    assert math.isfinite(fp8["final_loss"]) and fp8["x_bf16"] == fp8["tokens_per_s"] / bf16["tokens_per_s"]
    assert results["fp8-te"]["status"].startswith("skipped: precision.fp8_backend=te needs a CUDA device")
    for mode in results:                       # the markdown table has a row per mode
        assert f"\n| {mode} |" in r.stdout


def test_a_mode_past_its_time_box_is_killed_with_its_children(tmp_path):
    # a child that starts a grandchild (as inductor's compile workers are) and never finishes
    code = ("import subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
            f"open({str(tmp_path / 'pid')!r}, 'w').write(str(p.pid))\n"
            "time.sleep(120)\n")
    import time
    t = time.time()
    assert gpu.run_child([sys.executable, "-c", code], dict(os.environ), tmp_path / "log", timeout=3) is True
    assert time.time() - t < 30
    grandchild = int((tmp_path / "pid").read_text())
    for _ in range(50):                          # reaped by init soon after the kill
        if not Path(f"/proc/{grandchild}").exists() or "Z" in Path(f"/proc/{grandchild}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the grandchild survived the time box")
    assert gpu.run_child([sys.executable, "-c", "pass"], dict(os.environ), tmp_path / "log2", timeout=60) is False


def test_a_slow_mode_reports_the_steps_it_measured_before_its_deadline():
    import time
    args = gpu.parse_args(["--quick", "--modes", "bf16", "--steps", "1000000", "--warmup", "1"])
    args.child_deadline = time.time() + 3
    result = gpu.run_mode("bf16", args)
    assert result["status"] == "ok" and 1 <= result["steps"] < 1000000 and result["tokens_per_s"] > 0


@pytest.mark.slow   # five child processes (torch, torchao, transformers imports; two dynamo traces): ~40 s of CPU
def test_cpu_dry_run_takes_every_gpu_code_path_once(tmp_path):
    """`--device cpu --dry-run`: compile, the fused AdamW, torchao fp8 under compile, FSDP2 on one
    rank and the transformers side-by-side all run a step, so the GPU call cannot die on a typo."""
    out = tmp_path / "dry.json"
    r = bench("--device", "cpu", "--dry-run", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    results = {row["mode"]: row for row in json.loads(out.read_text())["results"]}
    assert list(results) == gpu.DRY_RUN_MODES.split(",")
    for mode, row in results.items():
        assert row["status"] == "ok", (mode, row["status"])
        assert row["steps"] == 1 and math.isfinite(row["final_loss"])
    assert results["fp8-torchao"]["fp8_layers"] == 2 * 7
    # the same initial weights and batches, one AdamW step of lr 1e-4 apart from the start: the
    # losses differ by the rounding of bf16 compute, at most ~2 bf16 ulps (2^-8 relative) of the loss
    losses = [row["final_loss"] for row in results.values()]
    assert max(losses) - min(losses) < 2 * max(losses) * 2 ** -8
    assert results["bf16"]["x_hf-bf16"] == results["bf16"]["tokens_per_s"] / results["hf-bf16"]["tokens_per_s"]
    assert "| hf-bf16 |" in r.stdout and "x hf-bf16" in r.stdout


def test_cpu_outside_quick_or_dry_run_is_refused(capsys):
    with pytest.raises(SystemExit):
        gpu.parse_args(["--device", "cpu"])
    assert "--device cpu: only with --quick or --dry-run" in capsys.readouterr().err
