"""Collectives of one tensor-parallel block against Megatron-LM's count (Korthikanti et al. 2022):
without SP, one all-reduce per half-block in forward (after wo, after w2) and one per half-block
in backward (the input gradients of q/k/v, and of w1/w3, summed first); with SP each all-reduce
becomes an all-gather + reduce-scatter pair: 2 all-gathers and 2 reduce-scatters each way."""
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.parallel.test_parity import ROOT, free_port


def test_tp_block_collectives_match_megatron(tmp_path):
    out = tmp_path / "comm.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(ROOT / "tests/parallel/comm_worker.py"), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert out.exists(), proc.stderr[-4000:]
    counts = json.loads(Path(out).read_text())
    assert counts["no_sp"] == {"forward": {"all_reduce": 2}, "backward": {"all_reduce": 2}}
    assert counts["sp"] == {"forward": {"all_gather_into_tensor": 2, "reduce_scatter_tensor": 2},
                            "backward": {"all_gather_into_tensor": 2, "reduce_scatter_tensor": 2}}
