"""`meshformer doctor`: plain-words checks, exit 1 on a problem; the NCCL/IB rules fed a cluster
this machine is not; the shared-run.dir check under a real 2-rank torchrun."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from launch.doctor import check_nccl_env, check_run_dir
from tests.launch.conftest import REPO, child_env, free_port

IFACES = ["lo", "eth0", "ib0"]


def doctor(*args, nproc=0, env=None):
    head = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
            str(free_port())] if nproc else [sys.executable]
    done = subprocess.run([*head, "-m", "trainer", "doctor", *args], cwd=REPO, env=env or child_env(),
                          capture_output=True, text=True, timeout=180)
    return done.returncode, done.stdout, done.stderr


def levels(checks):
    return [(c.level, c.text.split(" ")[0]) for c in checks]


def test_single_process_all_ok(tmp_path):
    rc, out, err = doctor("--run.dir", str(tmp_path / "run"))
    assert rc == 0, out + err
    lines = out.splitlines()
    assert lines[0].startswith("ok       torch ") and "build" in lines[0]
    assert any(line.startswith("ok") and "GiB free for run.dir" in line for line in lines), out
    assert not (tmp_path / "run").exists()           # a check, not a start: nothing created


def test_problems_are_one_line_each_and_exit_1(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    env = child_env(NCCL_SOCKET_IFNAME="nosuchif0", TORCH_NCCL_ASYNC_ERROR_HANDLING="0")
    rc, out, err = doctor("--run.dir", str(afile), env=env)
    assert rc == 1, out + err
    assert f"problem  run.dir {afile} is a file, not a folder" in out
    assert "problem  NCCL_SOCKET_IFNAME=nosuchif0 matches none of this node's network interfaces" in out
    assert "warning  TORCH_NCCL_ASYNC_ERROR_HANDLING=0: a failed or timed-out collective hangs" in out
    assert "Traceback" not in out + err


def test_nccl_rules():
    ib = {"mlx5_0": "InfiniBand", "mlx5_1": "InfiniBand"}
    assert levels(check_nccl_env({}, IFACES, {}, gpus=0, nodes=1)) == [("ok", "NCCL/IB")]
    assert levels(check_nccl_env({"NCCL_SOCKET_IFNAME": "ib", "NCCL_IB_HCA": "=mlx5_0:1"}, IFACES, ib, 8, 4)) == [("ok", "NCCL/IB")]
    assert levels(check_nccl_env({"NCCL_SOCKET_IFNAME": "^lo,docker"}, IFACES, ib, 8, 4)) == [("ok", "NCCL/IB")]
    assert levels(check_nccl_env({"NCCL_SOCKET_IFNAME": "^lo,eth,ib"}, IFACES, ib, 8, 4))[0][0] == "problem"
    assert levels(check_nccl_env({"NCCL_IB_HCA": "mlx4"}, IFACES, ib, 8, 1)) == [("problem", "NCCL_IB_HCA=mlx4")]
    roce_on_ib = check_nccl_env({"NCCL_IB_GID_INDEX": "3", "NCCL_SOCKET_IFNAME": "ib0"}, IFACES, ib, 8, 2)
    assert levels(roce_on_ib) == [("warning", "NCCL_IB_GID_INDEX=3")] and "InfiniBand" in roce_on_ib[0].text
    assert levels(check_nccl_env({"NCCL_SOCKET_IFNAME": "eth0"}, IFACES, {"mlx5_0": "Ethernet"}, 8, 2)) == [
        ("warning", "RoCE")]
    assert levels(check_nccl_env({}, IFACES, ib, 8, 2)) == [("warning", "NCCL_SOCKET_IFNAME")]   # several GPU nodes
    assert levels(check_nccl_env({"NCCL_IB_DISABLE": "1"}, IFACES, ib, 8, 1)) == [("warning", "NCCL_IB_DISABLE=1")]


def test_run_dir_space_and_writability(tmp_path):
    assert check_run_dir(tmp_path / "new" / "run", 1)[0].level == "ok"
    assert check_run_dir(tmp_path, 1 << 60)[0].level == "problem"          # an exabyte of checkpoints
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o500)
    if not os.access(locked, os.W_OK):         # root writes anywhere
        assert check_run_dir(locked / "run", 1)[0].level == "problem"


def test_two_ranks_see_one_run_dir(tmp_path):
    rc, out, err = doctor("--run.dir", str(tmp_path / "run"), nproc=2)
    assert rc == 0, out + err
    assert "ok       all 2 ranks on 1 node(s) reached the rendezvous and see one run.dir" in out, out + err
    assert [p.name for p in (tmp_path / "run").iterdir()] == []            # the probe files are gone


def test_two_ranks_with_separate_folders_are_told_it_is_not_shared(tmp_path):
    # each rank gets its own run.dir through an environment-specific path: what two nodes with
    # node-local disks look like
    script = tmp_path / "per_rank.py"
    script.write_text("import os, sys\nfrom trainer.cli import main\n"
                      f"sys.exit(main(['doctor', '--run.dir', '{tmp_path}/node-' + os.environ['RANK']]))\n")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(free_port()), str(script)], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=180)
    assert "is not one shared folder: 2 of 2 ranks do not see files other ranks wrote there" in done.stdout, \
        done.stdout + done.stderr
    assert done.returncode != 0
