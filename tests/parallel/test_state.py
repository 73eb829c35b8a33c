"""Checkpoint names do not depend on the pipeline layout (see parallel/state.py)."""
import json
import os
import subprocess
import sys

from tests.parallel.test_parity import ROOT, free_port


def test_pipeline_parts_state_uses_unsplit_names_and_round_trips(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(ROOT / "tests/parallel/state_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)
             if (tmp_path / f"rank-{r}.json").exists()]
    assert len(ranks) == 2, proc.stderr[-4000:]
    unsplit = set(ranks[0]["unsplit"])
    assert all(r["parts"] == 2 and r["restored"] for r in ranks)
    assert set(ranks[0]["model"]).isdisjoint(ranks[1]["model"])
    assert set(ranks[0]["model"]) | set(ranks[1]["model"]) == unsplit    # every weight, once, by its own name
    params = {n for n in unsplit}
    assert set(ranks[0]["optim"]) | set(ranks[1]["optim"]) <= params
    assert "layers.3.attention.wq.weight" in ranks[1]["optim"]           # rank 1 holds stages 1 and 3
