"""Inside a real srun step over two (loopback) nodes every task finds its own rank, local rank and
node, and all meet at the first node's address: the sum of ranks over the group is 0+1+2+3."""
import json

import pytest

from tests.launch.conftest import HERE

pytestmark = pytest.mark.slow


def test_srun_tasks_discover_their_place(slurm_cluster):
    done = slurm_cluster.run("srun", "--nodes=2", "--ntasks-per-node=2", "--time=5", "python", "-u",
                             str(HERE / "probe.py"), timeout=240, check=False)
    assert done.returncode == 0, done.stdout + done.stderr + slurm_cluster.logs()
    rows = sorted((json.loads(line.split(" ", 1)[1]) for line in done.stdout.splitlines()
                   if line.startswith("PROBE ")), key=lambda r: r["rank"])
    assert [(r["rank"], r["local_rank"], r["node_rank"]) for r in rows] == [(0, 0, 0), (1, 1, 0), (2, 0, 1), (3, 1, 1)]
    assert {r["world"] for r in rows} == {4} and {r["launcher"] for r in rows} == {"slurm"}
    assert {r["rank_sum"] for r in rows} == {6.0}
