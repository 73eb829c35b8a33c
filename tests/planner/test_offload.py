"""DeepSpeed ZeRO-3 + CPU offload in the planner (parallel/planner/offload.py): recommended where
no torch layout fits, refused beyond host memory, and its step time moving with the parameters and
the PCIe bandwidth as the model says."""
import json
from dataclasses import replace
from pathlib import Path

import pytest

from parallel.planner.cli import main, offload_beside
from parallel.planner.cluster import GIB, load_cluster
from parallel.planner.layout import Layout
from parallel.planner.offload import CPU_ADAMW_BYTES, HOST_STATE_BYTES, predict_offload, search_offload
from parallel.planner.run_config import read_run_config
from parallel.planner.search import search

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "llama3-8b.toml"
# A workstation: 24 GiB GPUs (RTX 4090 / A10 class), 256 GiB of host memory, PCIe Gen4.
WORKSTATION = """name = "ws24"
gpus_per_node = 2
gpu_memory_gib = 24
hbm_tbs = 1.0
[peak_tflops]
fp32 = 80.0
bf16 = 160.0
fp8 = 0.0
[network]
nvlink_gbs = 25.0
ib_gbs_per_gpu = 12.0
[efficiency]
matmul = 0.7
attention = 0.5
fp8_matmul = 0.5
hbm = 0.8
nvlink = 0.8
ib = 0.8
[host]
memory_gib = {host}
memory_gbs = 100.0
pcie_gbps = 25.0
"""


def _profile(tmp_path, host_gib):
    p = tmp_path / f"ws{host_gib}.toml"
    p.write_text(WORKSTATION.format(host=host_gib))
    return str(p)


def test_a_model_that_fits_only_with_offload_is_planned_with_it(tmp_path, capsys):
    """llama3-8b (8.0e9 params) on 2 x 24 GiB: its bf16 weights alone are 15 GiB per GPU under ZeRO-3,
    so with fp32 master, gradients and AdamW state no torch layout fits; offloading the optimizer
    (and the weights) fits, its host state 16-18 bytes x 8e9 = 120-134 GiB under the 256 GiB node."""
    args = ["--config", str(CONFIG), "--gpus", "2", "--train.seq_len", "2048"]
    assert main([*args, "--cluster", _profile(tmp_path, 256)]) == 0
    out = capsys.readouterr().out
    assert "no torch layout fits" in out and "it fits with DeepSpeed ZeRO-3 + CPU offload" in out
    assert "--parallel.engine deepspeed --parallel.zero_stage 3 --parallel.offload_optimizer cpu" in out
    assert "host 1" in out and "of 256 GiB per node" in out
    winner = out.split("winner as config overrides:\n  ")[1].split()
    run = read_run_config(str(CONFIG), winner)           # the overrides load as a valid run config
    assert (run.model.dim, run.seq_len) == (4096, 2048)
    # `plan predict` with those overrides gives the offload figures the plan printed
    assert main(["predict", "--config", str(CONFIG), "--cluster", _profile(tmp_path, 256), "--gpus", "2", *winner]) == 0
    pred = json.loads(capsys.readouterr().out)
    assert pred["engine"] == "deepspeed" and pred["fits"] and f"{pred['tokens_per_s']:,.0f} tokens/s" in out
    # the same model with too little host memory: refused, naming why
    assert main([*args, "--cluster", _profile(tmp_path, 64)]) == 2
    err = capsys.readouterr().err
    assert "DeepSpeed ZeRO-3 + CPU offload does not fit either" in err and "exceeds host memory" in err


def test_offload_is_shown_beside_torch_by_the_rule(capsys):
    """Torch layouts fit; offload is shown beside #1 exactly when predicted faster, when #1 is above
    90% of GPU memory, or when within 10% of #1 with the fully sharded state taking half a GPU or more.
    llama3-8b on 8 H100 (no TP needed once the AdamW state is off the GPU) and llama3-1b (a small
    model, offload a few % slower, nothing gained) fall on either side."""
    h100 = load_cluster("h100-sxm")
    seen = []
    for config in (CONFIG, CONFIG.with_name("llama3-1b.toml")):
        assert main(["--config", str(config), "--cluster", "h100-sxm", "--gpus", "8", "--top", "1"]) == 0
        shown = "DeepSpeed ZeRO-3 + CPU offload" in capsys.readouterr().out
        run = read_run_config(str(config), [])
        batch = 4 * 1024 ** 2 // run.seq_len
        best = search_offload(run.model, h100, 8, batch, run.seq_len).best
        assert best is not None and not best.offload_param    # optimizer offload alone fits 80 GiB
        top = search(run.model, h100, 8, batch, run.seq_len, headroom=0.9).ranked[0]
        ratio = best.tokens_per_s / top.tokens_per_s
        share = 16 * run.model.num_params() / 8 / h100.memory_bytes
        assert shown == (ratio > 1 or top.memory.total > 0.9 * top.memory.capacity or (ratio >= 0.9 and share >= 0.5))
        seen.append(shown)
    assert seen == [True, False]
    assert not offload_beside(0.95, False, 0.49) and offload_beside(0.95, False, 0.5) and offload_beside(0.5, True, 0)


def test_step_time_moves_with_parameters_and_pcie_bandwidth():
    """Without parameter offload the post-step upload of the bf16 partition (2 bytes x N/g) is exposed,
    and the gradient copy hides behind a backward far longer than it: exposed PCIe = 2N/g / bandwidth
    exactly. The CPU AdamW time is N/g x ranks per node x CPU_ADAMW_BYTES / host bandwidth."""
    run = read_run_config(str(CONFIG), ["--train.seq_len", "2048"])
    cluster = load_cluster("h100-sxm")
    layout = Layout(dp_shard=8, micro_batch=1, microbatches=4, seq_len=2048)
    base = predict_offload(run.model, layout, cluster, offload_param=False)
    n = run.model.num_params()
    assert base.pcie_exposed_s == pytest.approx(2 * n / 8 / (cluster.pcie_gbps * 1e9), rel=1e-9)
    assert base.cpu_adam_s == pytest.approx(8 * n / 8 * CPU_ADAMW_BYTES / (cluster.host_memory_gbs * 1e9 * 0.7))
    gen4 = predict_offload(run.model, layout, replace(cluster, pcie_gbps=25.0), offload_param=False)
    assert gen4.pcie_exposed_s == pytest.approx(2 * base.pcie_exposed_s) and gen4.step > base.step
    bigger = replace(run.model, n_layers=2 * run.model.n_layers)
    big = predict_offload(bigger, layout, cluster, offload_param=False)
    ratio = bigger.num_params() / n
    assert big.cpu_adam_s == pytest.approx(ratio * base.cpu_adam_s)
    assert big.pcie_exposed_s == pytest.approx(ratio * base.pcie_exposed_s) and big.step > base.step
    # host memory: 8 ranks x (16 bytes x N/8 + the per-rank baseline)
    assert base.host_bytes >= HOST_STATE_BYTES * n and base.host_bytes < HOST_STATE_BYTES * n + 8 * 5 * GIB


def test_host_keys_of_a_cluster_profile(tmp_path):
    """[host] is read from the profile; without it the documented defaults apply; a value <= 0 is
    refused naming the section."""
    assert load_cluster(_profile(tmp_path, 256)).host_memory_gib == 256
    bare = tmp_path / "bare.toml"
    bare.write_text(WORKSTATION.split("[host]")[0])
    c = load_cluster(str(bare))
    assert (c.host_memory_gib, c.host_memory_gbs, c.pcie_gbps) == (512.0, 205.0, 25.0)
    bad = tmp_path / "bad.toml"
    bad.write_text(WORKSTATION.format(host=256).replace("pcie_gbps = 25.0", "pcie_gbps = 0"))
    with pytest.raises(ValueError, match=r"\[host\] memory_gib, memory_gbs and pcie_gbps must be positive"):
        load_cluster(str(bad))
