"""Discovery from each launcher's variables (as dicts: no launcher needed), detection order, and
the bad-input errors; then a real rendezvous that nobody serves must fail fast and say where."""
import subprocess
import sys
import time

import pytest

from core.launch_config import LaunchConfig
from launch.discovery import LaunchError, detect_launcher, discover, from_mpi, from_slurm, from_torchrun, slurm_port

TORCHRUN = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
            "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x",
            "TORCHELASTIC_USE_AGENT_STORE": "True"}
SLURM_STEP = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1",
              "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "node[07-08]", "SLURM_STEP_NODELIST": "node[07-08]",
              "SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}


def test_torchrun_variables():
    info = from_torchrun(TORCHRUN)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size, info.node_rank) == (5, 8, 1, 4, 1)
    assert (info.master_addr, info.master_port, info.launcher, info.agent_store) == ("10.0.0.1", 29500, "torchrun", True)


def test_accelerate_is_torchrun_style():
    info = discover(LaunchConfig(), {**TORCHRUN, "ACCELERATE_MIXED_PRECISION": "no"})
    assert info.launcher == "accelerate" and info.rank == 5 and info.world_size == 8


def test_slurm_step_variables(monkeypatch):
    # node07 does not resolve here: the address falls back to the name, as Slurm would use it
    info = from_slurm(SLURM_STEP)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size, info.node_rank) == (3, 4, 1, 2, 1)
    assert info.master_addr == "node07"
    assert info.master_port == slurm_port(123456) == 20000 + 123456 % 10000
    assert info.launcher == "slurm"


def test_slurm_address_and_port_overrides():
    info = from_slurm({**SLURM_STEP, "MASTER_ADDR": "10.1.1.1", "MASTER_PORT": "31000"})
    assert (info.master_addr, info.master_port) == ("10.1.1.1", 31000)
    info = from_slurm(SLURM_STEP, LaunchConfig(master_addr="head", master_port=40000))
    assert (info.master_addr, info.master_port) == ("head", 40000)


def test_detection_order():
    assert detect_launcher({}) == "none"
    assert detect_launcher(SLURM_STEP) == "slurm"
    # the batch script itself (no step): SLURM_NTASKS describes the allocation, not this process
    batch = {k: v for k, v in SLURM_STEP.items() if not k.startswith("SLURM_STEP")}
    assert detect_launcher(batch) == "none"
    assert detect_launcher({**SLURM_STEP, **TORCHRUN}) == "torchrun"        # torchrun started by srun
    assert detect_launcher({**batch, "PMI_SIZE": "4", "PMI_RANK": "0"}) == "mpi"  # mpiexec in an allocation
    assert detect_launcher({"PMI_SIZE": "1"}) == "none"


def test_single_process_without_launcher():
    info = discover(LaunchConfig(), {})
    assert (info.rank, info.world_size, info.launcher) == (0, 1, "none")


@pytest.mark.parametrize("env, match", [
    ({"RANK": "0"}, "WORLD_SIZE is not set"),
    ({"WORLD_SIZE": "2"}, "RANK is not set"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "rank 2 is outside the world of 2"),
    ({"RANK": "0", "WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "29500"}, "set MASTER_ADDR and MASTER_PORT"),
])
def test_bad_torchrun_variables(env, match):
    with pytest.raises(LaunchError, match=match):
        discover(LaunchConfig(), env)


def test_forced_slurm_outside_srun():
    with pytest.raises(LaunchError, match="SLURM_PROCID is not set.*srun"):
        discover(LaunchConfig(launcher="slurm"), {})


def test_slurm_without_nodelist_names_the_fix():
    env = {k: v for k, v in SLURM_STEP.items() if "NODELIST" not in k}
    with pytest.raises(LaunchError, match="SLURM_JOB_NODELIST is not set.*MASTER_ADDR"):
        from_slurm(env)


def test_launch_config_checks():
    from core.run_config import load_config
    from core.config_parse import ConfigError
    with pytest.raises(ConfigError, match="launch.launcher"):
        load_config(None, ["--launch.launcher", "pbs"])
    with pytest.raises(ConfigError, match="launch.rendezvous_timeout_s"):
        load_config(None, ["--launch.rendezvous_timeout_s", "0"])
    assert load_config(None, ["--launch.launcher", "mpi"]).launch.launcher == "mpi"


UNREACHABLE = """
import json, sys
from core.launch_config import LaunchConfig
from launch.context import init_distributed
init_distributed(LaunchConfig(rendezvous_timeout_s=3), "cpu")
"""


def test_unreachable_rendezvous_fails_fast_with_the_address(tmp_path):
    """Rank 1 of an srun step whose rank 0 never comes: a LaunchError naming the address within
    about the timeout, not a hang."""
    from tests.launch.conftest import child_env, free_port
    port = free_port()        # nothing listens there
    env = child_env(SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2", SLURM_STEP_ID="0",
                    SLURM_LOCALID="0", SLURM_NODEID="1", SLURM_JOB_ID="7", MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(port))
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", UNREACHABLE], env=env, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert done.returncode != 0
    assert f"rank 1 could not reach the rendezvous at 127.0.0.1:{port}" in done.stderr, done.stderr[-2000:]
    assert "launch.rendezvous_timeout_s=3" in done.stderr
    assert elapsed < 40, f"took {elapsed:.0f} s to give up with a 3 s timeout"


def test_rank0_alone_times_out_naming_missing_processes(tmp_path):
    from tests.launch.conftest import child_env, free_port
    env = child_env(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    done = subprocess.run([sys.executable, "-c", UNREACHABLE], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "not all 2 processes joined" in done.stderr, done.stderr[-2000:]


class FakeComm:
    """COMM_WORLD as seen by one rank: allgather/bcast return what the other ranks would send."""

    def __init__(self, rank, hosts, root_value=None):
        self.rank, self.hosts, self.root_value = rank, hosts, root_value

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return len(self.hosts)

    def allgather(self, mine):
        return [mine if r == self.rank else h for r, h in enumerate(self.hosts)]

    def bcast(self, value, root=0):
        return value if self.rank == root else self.root_value


def test_mpi_rank0_picks_the_rendezvous_and_others_receive_it():
    import socket
    me = socket.gethostname()
    info0 = from_mpi(LaunchConfig(), comm=FakeComm(0, [me, me]))
    assert (info0.rank, info0.world_size, info0.launcher, info0.master_addr) == (0, 2, "mpi", "127.0.0.1")
    assert 0 < info0.master_port < 65536
    info1 = from_mpi(LaunchConfig(), comm=FakeComm(1, [me, me], root_value=("10.0.0.9", 4242)))
    assert (info1.rank, info1.master_addr, info1.master_port, info1.node_rank) == (1, "10.0.0.9", 4242, 0)
    info3 = from_mpi(LaunchConfig(), comm=FakeComm(3, ["a", "a", "b", me], root_value=("a", 1)))
    assert info3.node_rank == 2                       # third distinct host in rank order
    fixed = from_mpi(LaunchConfig(master_addr="head", master_port=5000), comm=FakeComm(0, [me, "other"]))
    assert (fixed.master_addr, fixed.master_port) == ("head", 5000)


def test_torchrun_restart_with_a_shared_store_is_refused_with_the_fix():
    env = {**TORCHRUN, "TORCHELASTIC_RESTART_COUNT": "1"}
    with pytest.raises(LaunchError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        from_torchrun(env)
    assert from_torchrun({**env, "TORCHELASTIC_USE_AGENT_STORE": "False"}).rank == int(TORCHRUN["RANK"])
    assert from_torchrun({**TORCHRUN, "TORCHELASTIC_RESTART_COUNT": "0"}).agent_store
