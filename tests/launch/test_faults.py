"""Faults at scale, on gloo with the real trainer CLI and the built-in data stream: a rank that is
stuck (alive, not dead) is named with the collective it holds up within launch.timeout_s, and a
rank killed with SIGKILL mid-training is brought back by torchrun --max-restarts from the last
checkpoint, finishing with the uninterrupted run's losses exactly (same layout, same CPU kernels:
a resume restores every number bit for bit, so no tolerance)."""
from __future__ import annotations

import json
import re
import sys
import time

from launch.watchdog import EXIT_STALLED, collective_timeout_s
from tests.launch.conftest import child_env, run_logged, tail
from tests.launch.runs import write_config

TIMEOUT_S = 5


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]


def losses(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_stuck_rank_is_named_with_its_collective_within_timeout(tmp_path):
    cfg = write_config(tmp_path, steps=20, extra=f"[launch]\ntimeout_s = {TIMEOUT_S}\n")
    mark, log = tmp_path / "stalled-at", tmp_path / "log"
    env = child_env(MESHFORMER_TEST_FAULT="stall:2:3", MESHFORMER_TEST_FAULT_MARK=str(mark))
    rc = run_logged(torchrun(4, "-m", "tests.launch.fault_trainer", "--config", str(cfg), "--run.dir",
                             str(tmp_path / "run"), "--parallel.tp", "2", "--parallel.dp_shard", "2"),
                    log, env=env, timeout=240)
    ended = time.time()
    text = log.read_text()
    assert rc != 0 and mark.exists(), tail(log)
    # the watchdog's bound: timeout_s, one poll (timeout_s / 10), the wait for the other ranks'
    # reports (2 s at this timeout), plus 10 s for torchrun to notice and tear down on 2 loaded cores;
    # gloo's own timeout (collective_timeout_s) would only have fired later.
    waited = ended - float(mark.read_text())
    assert TIMEOUT_S < waited < TIMEOUT_S + TIMEOUT_S / 10 + 2 + 10 < collective_timeout_s(TIMEOUT_S), (waited, tail(log))
    lines = [line for line in text.splitlines() if "no progress for" in line]
    assert len(lines) == 1, tail(log, 80)
    assert re.search(r"launch error: no progress for \d+ s \(launch.timeout_s=5\): rank 2 has not joined "
                     r"gloo:\w+ #\d+ on process group \S+ \(ranks? [\d, ]+ waiting in it\)", lines[0]), lines[0]
    assert "rank 0 has not" not in lines[0] and "rank 1 has not" not in lines[0] and "rank 3 has not" not in lines[0]
    assert f"exitcode  : {EXIT_STALLED}" in text, tail(log, 80)


def test_killed_rank_restarts_from_checkpoint_to_the_same_losses(tmp_path):
    cfg = write_config(tmp_path, steps=8, every=2)
    layout = ["--parallel.dp_shard", "4"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    rc = run_logged(torchrun(4, "-m", "trainer", "--config", str(cfg), "--run.dir", str(ref), *layout),
                    tmp_path / "ref.log", timeout=300)
    assert rc == 0, tail(tmp_path / "ref.log")
    # the console under torchrun: one human line per logged step from rank 0 alone, then the closing line
    text = (tmp_path / "ref.log").read_text()
    assert re.findall(r"^step (\d+)/8 \| loss ", text, re.M) == [str(s) for s in range(1, 9)], tail(tmp_path / "ref.log")
    assert re.search(rf"^done: 8/8 steps \| .* \| checkpoint {re.escape(str(ref / 'checkpoints' / 'step-00000008'))}$",
                     text, re.M), tail(tmp_path / "ref.log")

    log = tmp_path / "run.log"
    # torchrun's default shares its rendezvous store with restarted workers, stale addresses
    # included (launch/discovery.py refuses that with the fix); this is the fix
    env = child_env(MESHFORMER_TEST_FAULT="kill:2:5", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    rc = run_logged(torchrun(4, "--max-restarts", "1", "-m", "tests.launch.fault_trainer", "--config", str(cfg),
                             "--run.dir", str(run), *layout), log, env=env, timeout=300)
    text = log.read_text()
    assert rc == 0, tail(log, 80)
    assert "failed (exitcode: -9) local_rank: 2" in text, tail(log, 80)      # rank 2 died of SIGKILL
    assert f"resumed from {run / 'checkpoints' / 'step-00000004'} at step 4" in text, tail(log, 80)
    want, got = losses(ref), losses(run)
    assert sorted(got) == list(range(1, 9)), got          # rows past the checkpoint were trimmed, then rewritten
    assert got == want, (got, want)
    assert json.loads((run / "summary.json").read_text())["final_loss"] == json.loads(
        (ref / "summary.json").read_text())["final_loss"]


def test_diagnosis_names_the_root_not_the_ranks_waiting_for_it():
    from launch.watchdog import diagnose
    # TP 2 x FSDP 2 (tp groups {0,1} {2,3}, dp groups {0,2} {1,3}); rank 2 stuck before step 5's
    # first all_gather: rank 0 waits for it on dp{0,2}; rank 1 waits for rank 0 on tp{0,1} and is
    # therefore behind on dp{1,3}, where rank 3 went on and now waits for rank 2 on tp{2,3}.
    reports = {0: {"step": 4, "groups": {"dp02": [31, "gloo:all_gather", False], "tp01": [95, "gloo:all_reduce", True]}},
               1: {"step": 4, "groups": {"dp13": [31, "gloo:all_gather", True], "tp01": [96, "gloo:all_reduce", False]}},
               2: {"step": 4, "groups": {"dp02": [30, "gloo:all_gather", True], "tp23": [95, "gloo:all_reduce", True]}},
               3: {"step": 4, "groups": {"dp13": [31, "gloo:all_gather", True], "tp23": [96, "gloo:all_reduce", False]}}}
    stuck, why = diagnose(reports, 4)
    assert stuck == [2], why
    assert why == ("rank 2 has not joined gloo:all_gather #31 on process group dp02 (rank 0 waiting in it) and "
                   "gloo:all_reduce #96 on process group tp23 (rank 3 waiting in it), last finished step 4")
    # a rank that never answers (frozen with the GIL held, or its node gone) is named as such
    del reports[2]
    stuck, why = diagnose(reports, 4)
    assert 2 in stuck and "rank 2 did not answer at all" in why
    # without the flight recorder: the rank that is a step behind
    stuck, why = diagnose({0: {"step": 7, "groups": {}}, 1: {"step": 6, "groups": {}}}, 2)
    assert stuck == [1] and "rank 1 last finished step 6, the others later" in why
