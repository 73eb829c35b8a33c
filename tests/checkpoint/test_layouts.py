"""Model parts as a pipeline rank holds them — a list of stage modules with an optimizer each
(torchtitan's way), then one ModuleList with one optimizer (parallel/'s way) — save and load the
single-process keys: resuming across them matches one uninterrupted run. The multi-process
layouts (FSDP, TP x FSDP, PP) are in test_train_layouts.py through the real trainer."""
import json
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
WORKER = str(ROOT / "tests/checkpoint/layout_worker.py")


def launch(nproc, *args):
    if nproc == 1:                       # in this process: saves a process start-up
        import contextlib
        import io

        import torch

        from tests.checkpoint.layout_worker import main
        threads, buf = torch.get_num_threads(), io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                main(args[0], args[1], int(args[2]), args[3], len(args) > 4 and args[4] == "async")
        finally:
            torch.set_num_threads(threads)
        return buf.getvalue()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, WORKER, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--standalone", WORKER, *args]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r.stdout


def test_resume_across_model_parts_matches_single_process(tmp_path):
    ref = tmp_path / "ref.json"
    launch(1, "single", str(tmp_path / "ref"), "10", str(ref))
    want = {int(k): v for k, v in json.loads(ref.read_text()).items()}

    run = str(tmp_path / "run")
    got = {}
    for nproc, layout, stop, extra in ((1, "single", 3, []), (1, "parts2", 6, ["async"]), (1, "stages2", 8, []),
                                       (1, "single", 10, [])):
        out = tmp_path / f"{layout}-{stop}.json"
        printed = launch(nproc, layout, run, str(stop), str(out), *extra)
        if stop != 3:
            assert "resumed from" in printed
        got.update({int(k): v for k, v in json.loads(out.read_text()).items()})
    assert sorted(got) == list(range(1, 11))
    for step in range(1, 11):
        assert abs(got[step] - want[step]) < 1e-5, (step, got[step], want[step])
