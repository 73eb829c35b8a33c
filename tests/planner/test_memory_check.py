"""The trainer's start-up memory check (trainer/memory_check.py): a run that cannot fit is refused
before anything is allocated, naming a layout that would fit; "warn" starts anyway; the CPU
estimate brackets the measured peak RSS growth."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.errors import ConfigError
from core.run_config import load_config
from tests.trainer.fixtures import fixed_factory
from trainer import memory_check
from trainer.train import train

ROOT = Path(__file__).resolve().parents[2]
GIB = 1024 ** 3
SMALL = ["--model.dim", "32", "--model.n_layers", "2", "--model.n_heads", "4", "--train.seq_len", "32",
         "--train.batch_size", "4", "--train.steps", "1", "--train.eval_batches", "1", "--train.device", "cpu",
         "--metrics.progress", "false", "--metrics.tensorboard", "false", "--checkpoint.every", "0"]


def test_llama3_8b_on_this_cpu_is_refused_before_allocating(tmp_path):
    """The user's case: configs/llama3-8b.toml on a CPU machine. Refused with one line (exit 2)
    naming estimate, what is available and a layout, while the process never grows past what
    torch's import takes: the model's fp32 weights alone would be 30 GiB."""
    avail = memory_check.host_available_bytes()
    layers = 32 * max(1, math.ceil(avail / (128 * GIB)))   # more than any host has, however large
    run = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
           "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); print(p.stderr, end='')")
    cmd = [sys.executable, "-c", run, sys.executable, "-m", "trainer", "train", "--config", "configs/llama3-8b.toml",
           "--run.dir", str(tmp_path / "l8"), "--train.device", "cpu", "--model.n_layers", str(layers)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    head, *err = proc.stdout.splitlines()
    code, maxrss_kib = map(int, head.split())
    assert code == 2, proc.stdout
    assert len(err) == 1 and err[0].startswith("meshformer train: config error: train.memory_check: "), err
    line = err[0]
    for must in ("needs about", "GiB per process (params", "+ margin", "GiB is available", "--parallel.tp",
                 "--parallel.dp_shard", "train.memory_check = \"warn\""):
        assert must in line, (must, line)
    assert maxrss_kib * 1024 < 2 * GIB, f"grew to {maxrss_kib / 2**20:.1f} GiB before refusing"


def test_modes_error_warn_off(tmp_path, monkeypatch, capsys):
    """With 64 MiB per process the small model does not fit (the CPU reserve alone is 0.25 GiB, so
    no number of processes helps): "error" refuses before the run folder gets a checkpoint, "warn"
    prints that line and trains, "off" trains without a word."""
    monkeypatch.setattr(memory_check, "host_available_bytes", lambda: 64 * 2 ** 20)
    cfg = lambda name, mode: load_config("configs/tiny.toml", [*SMALL, "--run.dir", str(tmp_path / name),
                                                                "--train.memory_check", mode])
    with pytest.raises(ConfigError, match=r"train.memory_check: this run needs about .* 0.1 GiB is available "
                                          r".*no layout fits even 4096 processes"):
        train(cfg("error", "error"), loader_factory=fixed_factory())
    assert not (tmp_path / "error" / "checkpoints").exists()
    capsys.readouterr()
    assert train(cfg("warn", "warn"), loader_factory=fixed_factory())["steps"] == 1
    assert "warning: train.memory_check: this run needs about" in capsys.readouterr().err
    assert train(cfg("off", "off"), loader_factory=fixed_factory())["steps"] == 1
    assert "memory_check" not in capsys.readouterr().err


def test_same_world_suggestion_is_a_layout_that_fits():
    """Where the same processes can hold the model under another layout, the line names that
    layout; applied to the config, it keeps the global batch and its estimate fits."""
    args = [*SMALL, "--model.dim", "256", "--train.seq_len", "512", "--model.max_seq_len", "512",
            "--train.batch_size", "32"]
    cfg = load_config("configs/tiny.toml", args)
    layout = memory_check.config_layout(memory_check.run_settings(cfg), 1)
    roomy = memory_check.local_profile(memory_check.torch.device("cpu"), memory_check.Available(64 * GIB, "", 1), 1.0)
    need = memory_check.memory_per_gpu(cfg.model, layout, memory_check.Stack(), roomy).total
    small = memory_check.dataclasses.replace(roomy, gpu_memory_gib=0.8 * need / GIB)
    text = memory_check.suggest(cfg, layout, small, 1)
    assert text.startswith("a layout of these 1 process that fits"), text
    better = memory_check.config_layout(memory_check.run_settings(
        load_config("configs/tiny.toml", [*args, *text.split("): ")[1].split()])), 1)
    assert better != layout and better.global_batch == layout.global_batch
    assert memory_check.memory_per_gpu(cfg.model, better, memory_check.Stack(), small).fits


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's VmHWM reset")
def test_cpu_estimate_brackets_measured_peak_rss(tmp_path):
    """The planner's terms without the margin must not exceed the measured growth of peak RSS (the
    terms are tensors that really exist at the peak), and the estimate with the CPU margin must
    cover it (else the check would let an OOM through). Two shapes: the tiny demo model, and an
    activation-heavy one under full checkpointing (the largest measured/estimated ratio found)."""
    shapes = [[], ["--model.dim", "256", "--model.n_layers", "2", "--train.seq_len", "512", "--model.max_seq_len",
                   "512", "--train.batch_size", "8", "--parallel.ac", "full"]]
    proc = subprocess.run([sys.executable, "tests/planner/rss_worker.py", str(tmp_path), json.dumps(shapes)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"shape"')]
    assert len(rows) == 2
    for r in rows:
        used = r["total"] - r["margin"]
        print(f"{r['shape']}: terms {used / 2**20:.0f} MiB <= measured {r['grew'] / 2**20:.0f} MiB <= "
              f"estimate {r['total'] / 2**20:.0f} MiB")
        assert used <= r["grew"] <= r["total"], r


def test_gpu_profile_takes_the_free_memory_and_the_named_speeds(monkeypatch):
    """No GPU here: the name lookup is what can go wrong. An H200 gets h200's speeds with the free
    memory read at start-up; an unknown GPU gets H100's speeds; the reserve is the 1 GiB of
    buffers allocated after the check (the CUDA context is already out of the free figure)."""
    avail = memory_check.Available(100 * GIB, "", 8)
    for name, profile in (("NVIDIA H200", "h200"), ("NVIDIA L40S", "h100-sxm")):
        monkeypatch.setattr(memory_check.torch.cuda, "get_device_name", lambda device, name=name: name)
        p = memory_check.local_profile(memory_check.torch.device("cuda", 0), avail, 1.0)
        assert p.name == profile and p.memory_bytes == 100 * GIB and p.gpus_per_node == 8
        assert p.reserved_gib == memory_check.GPU_RESERVED_GIB and p.activation_slack == 0


def test_deepspeed_offload_on_a_gpu_leaves_the_offloaded_state_out():
    """ZeRO-Offload holds the optimizer state and fp32 gradients on the host, ZeRO-Infinity the
    parameters too: on a GPU the check counts only what stays there (on a CPU nothing moves)."""
    dims = ["--parallel.engine", "deepspeed", "--parallel.dp_shard", "2", "--parallel.zero_stage", "3"]
    cfg = load_config("configs/tiny.toml", [*SMALL, *dims])
    layout = memory_check.config_layout(memory_check.run_settings(cfg), 2)
    profile = memory_check.local_profile(memory_check.torch.device("cpu"), memory_check.Available(64 * GIB, "", 1), 1.0)
    gpu = memory_check.torch.device("cuda")
    plain = memory_check._estimate(cfg, layout, profile, gpu)
    opt = memory_check._estimate(load_config("configs/tiny.toml", [*SMALL, *dims, "--parallel.offload_optimizer", "cpu"]),
                                 layout, profile, gpu)
    both = memory_check._estimate(load_config("configs/tiny.toml", [*SMALL, *dims, "--parallel.offload_optimizer", "cpu",
                                                                    "--parallel.offload_param", "cpu"]), layout, profile, gpu)
    assert plain.total - opt.total == plain.grads + plain.optimizer > 0
    assert opt.total - both.total == plain.params > 0
    cpu = memory_check.torch.device("cpu")
    assert memory_check._estimate(load_config("configs/tiny.toml", [*SMALL, *dims, "--parallel.offload_optimizer", "cpu"]),
                                  layout, profile, cpu).total == memory_check._estimate(cfg, layout, profile, cpu).total
