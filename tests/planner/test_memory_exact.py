"""The planner's model-state memory per rank equals the real sharded tensors (FSDP2, TP, PP)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from parallel.planner.layout import Layout, Stack
from parallel.planner.memory import model_state
from parallel.planner.shapes import local_shape, stage_param_specs
from tests.planner.memory_cases import CASES, WORLD

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("planner_mem")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with socket.socket() as sock:       # a free loopback port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
           "--master_addr", "127.0.0.1", "--master_port", str(port), str(ROOT / "tests/planner/memory_worker.py"), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _layout(case) -> Layout:
    dp = WORLD // (case["tp"] * case["pp"])
    return Layout(tp=case["tp"], pp=case["pp"], dp_shard=dp, microbatches=max(case["pp"], 1),
                  dtype="fp32", seq_len=case["seq_len"])


def _padding_bytes(case, stage: int) -> int:
    """Most bytes FSDP's dim-0 padding can add over params, grads and Adam's two states."""
    lay = _layout(case)
    pad = 0
    for spec in stage_param_specs(case["model"], lay.pp, 1, stage):
        shape = local_shape(spec, lay.tp)
        row = 1
        for s in shape[1:]:
            row *= s
        pad += row if shape[0] % lay.dp_shard else 0
    return pad * 4 * 4


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_model_state_matches_real_shards(measured, name):
    case = CASES[name]
    lay = _layout(case)
    for rank, res in enumerate(measured):
        got = res[name]
        want = model_state(case["model"], lay, Stack(), got["stage"])
        assert want.tensors == got["tensors"], (rank, want, got)
        pad = _padding_bytes(case, got["stage"])
        for key, predicted in (("params", want.param_bytes), ("grads", want.grad_bytes),
                               ("optimizer", want.optimizer_bytes)):
            # FSDP2 stores padded shards; the local tensors it shows are the unpadded part
            assert got[key] <= predicted <= got[key] + pad, (rank, key, predicted, got[key], pad)
        if pad == 0:     # sizes divide: exact to the byte
            assert (want.param_bytes, want.grad_bytes, want.optimizer_bytes) == \
                (got["params"], got["grads"], got["optimizer"]), (rank, name)


def test_uneven_case_really_pads():
    """The GPT case is there to exercise padding: its vocabulary does not divide over 4 ranks."""
    assert _padding_bytes(CASES["fsdp4"], 0) > 0
    assert all(_padding_bytes(CASES[n], s) == 0 for n in ("tp2_fsdp2", "pp2_fsdp2") for s in (0, 1)
               if s < CASES[n]["pp"])


@pytest.mark.parametrize("name", list(CASES))
def test_param_specs_match_the_model(name):
    """The planner's parameter list is the model's own: names, shapes and the ModelConfig count."""
    import torch
    from trainer.model import Transformer
    cfg = CASES[name]["model"]
    with torch.device("meta"):
        model = Transformer(cfg)
    specs = stage_param_specs(cfg, 1, 1, 0)
    assert {s.name: s.shape for s in specs} == {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert sum(s.numel for s in specs) == cfg.num_params()
