"""Meta-device build and sharded init (parallel/sharded_init.py): every layout starts from the
single-process weights, bit for bit, and no rank holds the whole model while building it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from core.model_config import ModelConfig
from launch.context import DistContext
from parallel.mesh import build_mesh
from tests.parallel.init_worker import SEED, SMALL, config
from tests.parallel.test_parity import free_port
from trainer.model import Transformer
from trainer.train import build_model

ROOT = Path(__file__).resolve().parents[2]
TWO_RANKS = {
    "fsdp2": "--parallel.dp_shard 2",
    "tp2": "--parallel.tp 2",
    "pp2": "--parallel.pp 2",
    "ddp2": "--parallel.dp_replicate 2 --parallel.dp_shard 1",
    "pp2_interleaved_uneven": "--parallel.pp 2 --parallel.pp_schedule interleaved_1f1b --parallel.pp_virtual_stages 2 "
                              "--model.n_layers 5 --parallel.pp_layers 1,2,1,1",   # every stage >= 1 layer
    "tp2_tied_alibi_gelu_ln": "--parallel.tp 2 --model.tie_embeddings true --model.position alibi "
                              "--model.activation gelu --model.norm layernorm --model.bias true",
    "tp2_relative": "--parallel.tp 2 --model.position relative",      # a [buckets, heads] table sharded on dim 1
    "fsdp2_tied_learned": "--parallel.dp_shard 2 --model.tie_embeddings true --model.position learned",
    "fsdp2_mup": "--parallel.dp_shard 2 --model.parametrization mup --model.mup_base_dim 8",  # hidden std / sqrt(4)
    "fsdp2_offload": "--parallel.dp_shard 2 --parallel.fsdp_cpu_offload true",
    # checkpoint.init_from safetensors: our names, and a Hugging Face export (renamed, q/k permuted)
    "load_ours_fsdp2": "--parallel.dp_shard 2 --checkpoint.init_from {ours}",
    "load_hf_tp2": "--parallel.tp 2 --checkpoint.init_from {hf}",
    "load_ours_pp2": "--parallel.pp 2 --checkpoint.init_from {ours}",
    "load_ours_ddp2": "--parallel.dp_replicate 2 --parallel.dp_shard 1 --checkpoint.init_from {ours}",
}
FOUR_RANKS = {
    "tp2_fsdp2": "--parallel.tp 2 --parallel.dp_shard 2",
    "tp2_fsdp2_tied": "--parallel.tp 2 --parallel.dp_shard 2 --model.tie_embeddings true",
    "pp2_tp2": "--parallel.pp 2 --parallel.tp 2",
    "hsdp2x2": "--parallel.dp_replicate 2 --parallel.dp_shard 2",
    "load_hf_tp2_fsdp2": "--parallel.tp 2 --parallel.dp_shard 2 --checkpoint.init_from {hf}",
}
WEIGHTS_SEED = 99


def torchrun(nproc: int, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(ROOT / "tests/parallel/init_worker.py"), *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def model_args(layout: str) -> list[str]:
    words = layout.split()
    return [w for k, v in zip(words[::2], words[1::2]) if k.startswith("--model.") for w in (k, v)]


def weights_state() -> dict:
    """What the safetensors files hold: the model initialised from another seed."""
    model = Transformer(config(SMALL).model)
    model.init_weights(WEIGHTS_SEED)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def write_weights(out: Path) -> dict[str, str]:
    """The same weights under our names (one file) and as a Hugging Face export (a folder)."""
    from safetensors.torch import save_file
    from trainer.hf_llama import hf_config, to_hf
    mc = config(SMALL).model
    sd = weights_state()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "ours.safetensors"))
    (out / "hf").mkdir()
    save_file(to_hf(sd, mc), str(out / "hf" / "model.safetensors"))
    (out / "hf" / "config.json").write_text(json.dumps(hf_config(mc)))
    return {"ours": str(out / "ours.safetensors"), "hf": str(out / "hf")}


def single(layout: str) -> dict:
    """The single-process trainer's initial weights for the layout's model options."""
    cfg = config(SMALL + model_args(layout))
    par, _ = build_model(cfg, build_mesh(cfg.parallel, DistContext()), torch.device("cpu"))
    return {k: v.detach().clone() for k, v in par.model.state_dict().items()}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("init")
    paths = write_weights(out)
    got = {}
    for nproc, layouts in ((2, TWO_RANKS), (4, FOUR_RANKS)):
        specs = [f"{k}={v.format(**paths)}" for k, v in layouts.items()]
        proc = torchrun(nproc, ["state", str(out), *specs], timeout=600)
        for name in layouts:
            f = out / f"{name}.pt"
            got[name] = torch.load(f, weights_only=True) if f.exists() else {"error": proc.stderr[-6000:]}
    return got


def assert_bit_equal(got: dict, want: dict, name: str) -> None:
    assert sorted(got) == sorted(want), name
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, f"{name}: {k}"
        assert torch.equal(got[k], want[k]), f"{name}: {k} differs from the single-process init"


@pytest.mark.parametrize("name", [*TWO_RANKS, *FOUR_RANKS])
def test_initial_state_equals_single_process(name, results):
    got = results[name]
    assert "error" not in got, f"{name} failed:\n{got.get('error')}"
    assert got["meta_left"] == []
    want = weights_state() if name.startswith("load_") else single({**TWO_RANKS, **FOUR_RANKS}[name])
    assert_bit_equal(got["state"], want, name)
    if "tied" in name:
        assert got["tied"] is True, f"{name}: the head no longer shares the embedding's parameter"


def test_single_process_trainer_init_is_the_models_own():
    """The eager model (Transformer(cfg) then init_weights(seed)) and the trainer's meta build give
    the same weights; a different seed gives different ones."""
    cfg = config(SMALL)
    eager = Transformer(cfg.model)
    eager.init_weights(SEED)
    want = single("")
    assert_bit_equal(dict(eager.state_dict()), want, "eager")
    eager.init_weights(SEED + 1)
    assert not torch.equal(eager.state_dict()["layers.0.attention.wq.weight"], want["layers.0.attention.wq.weight"])


def test_initial_values_follow_the_models_rules():
    """Norms 1, biases 0, matrices normal(0, init_std), residual projections scaled by
    1/sqrt(2 n_layers): checked on a model large enough for the sample std to be within 2%
    (n = 65536 draws per matrix: the std's relative standard error is 1/sqrt(2n) = 0.3%)."""
    cfg = ModelConfig(dim=256, n_layers=4, n_heads=4, vocab_size=256, ffn_hidden=256, bias=True, norm="layernorm")
    model = Transformer(cfg)
    model.init_weights(3)
    sd = model.state_dict()
    out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
    for k, v in sd.items():
        if v.ndim == 1:
            assert torch.all(v == (0 if k.endswith("bias") else 1)), k
        else:
            std = out_std if k.endswith(("wo.weight", "w2.weight")) else cfg.init_std
            assert v.std().item() == pytest.approx(std, rel=0.02), k
            assert abs(v.mean().item()) < 6 * std / v.numel() ** 0.5, k
    # one generator per parameter: two layers' matrices are different draws
    assert not torch.equal(sd["layers.0.attention.wq.weight"], sd["layers.1.attention.wq.weight"])


@pytest.mark.slow
def test_fsdp4_peak_rss_below_half_the_model(tmp_path):
    """FSDP x4 on a ~2.1 GB (fp32) model: each rank's resident memory grows by its quarter of the
    weights plus one full parameter at a time (the largest, the 32000 x 2048 embedding, 0.26 GB),
    never by the model: the peak above the pre-build RSS must stay below half the model's bytes."""
    out = tmp_path / "rss.json"
    args = ["--model.dim", "2048", "--model.n_layers", "8", "--model.n_heads", "16", "--model.n_kv_heads", "16",
            "--model.vocab_size", "32000", "--parallel.dp_shard", "4", "--run.seed", "1"]
    proc = torchrun(4, ["rss", str(out), *args], timeout=900)
    assert out.exists(), proc.stderr[-6000:]
    rows = json.loads(out.read_text())
    model_bytes = rows[0]["model_param_bytes"]
    assert 1.9e9 < model_bytes < 2.3e9
    limit = model_bytes / 2
    for r in rows:
        grew = (r["peak_kib"] - r["baseline_kib"]) * 1024
        print(f"rank {r['rank']}: baseline RSS {r['baseline_kib'] / 2**20:.3f} GiB, peak {r['peak_kib'] / 2**20:.3f} GiB "
              f"(peak reset: {r['peak_reset']}), grew {grew / 2**30:.3f} GiB for local parameters of "
              f"{r['local_param_bytes'] / 2**30:.3f} GiB; model {model_bytes / 2**30:.3f} GiB, limit {limit / 2**30:.3f} GiB")
        assert r["local_param_bytes"] == pytest.approx(model_bytes / 4, rel=0.01)
        assert grew < limit, f"rank {r['rank']} grew by {grew / 2**30:.3f} GiB building a {model_bytes / 2**30:.3f} GiB model"
