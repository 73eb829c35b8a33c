"""What a person sees: one human line per logged step in piped output (no JSON), a closing line,
Ctrl-C saving like SIGTERM, a rerun of a finished run saying so, --version / --print-config /
--dry-run. One real process (the Ctrl-C run); the rest calls the CLI in this process."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

from launch import preemption
from launch.preemption import EXIT_PREEMPTED, Preemption
from trainer.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model.dim", "32", "--model.n_layers", "1", "--model.n_heads", "2", "--model.n_kv_heads", "2",
        "--model.max_seq_len", "64", "--train.seq_len", "16", "--train.batch_size", "2", "--train.device", "cpu",
        "--train.threads", "1", "--train.eval_batches", "1", "--metrics.log_every", "1",
        "--metrics.tensorboard", "false", "--checkpoint.every", "0", "--optim.warmup_steps", "2"]
STEP_LINE = re.compile(r"step (\d+)/(\d+) \| loss \d+\.\d{4} \| grad \S+ \| lr \d\.\d\de[-+]\d\d \| [\d.]+[kMG]? tok/s"
                       r" \| mfu \d+\.\d% \| mem \d+\.\d GiB( \| eta (\d+s|\d+m\d\ds|\d+h\d\dm))?")


@pytest.fixture(autouse=True)
def usr1_restored():
    """The CLI sets SIGUSR1 to ignored for its process; give this one its handler back."""
    old = signal.getsignal(signal.SIGUSR1)
    yield
    signal.signal(signal.SIGUSR1, old)


def test_ctrl_c_saves_and_resume_continues_with_human_lines(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    args = ["train", *TINY, "--run.dir", str(run), "--train.eval_every", "0"]
    # A real process with its output piped, as under Slurm or `| tee`: long enough (2000 steps)
    # that the Ctrl-C sent after the second step line lands mid-run.
    proc = subprocess.Popen([sys.executable, "-m", "trainer", *args, "--train.steps", "2000"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    out = []
    # read to the end here: communicate() after a break would miss lines already in proc.stdout's
    # read-ahead buffer (it reads the pipe itself), e.g. step 3's when it came right after step 2's
    for line in proc.stdout:
        out.append(line)
        if line.startswith("step 2/2000 |"):
            proc.send_signal(signal.SIGINT)
    err = proc.stderr.read()          # a few lines: cannot fill the pipe while stdout was read
    proc.wait(timeout=120)
    out = "".join(out)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "Ctrl-C: saving a checkpoint at the end of this step" in err and "Traceback" not in err
    assert "exiting with code 75; run the same command to resume" in err + "".join(out)
    assert not [x for x in out.splitlines() if x.lstrip().startswith("{")], out     # JSON only in metrics.jsonl
    steps = [int(m.group(1)) for m in map(STEP_LINE.fullmatch, out.splitlines()) if m]
    stopped = steps[-1]
    assert steps == list(range(1, stopped + 1)) and 2 <= stopped < 2000, out
    first, second = (next(x for x in out.splitlines() if x.startswith(f"step {n}/")) for n in (1, 2))
    assert "eta" not in first and " | eta " in second      # the pace is known from step 2 (step 1 warms up)
    ckpt = run / "checkpoints" / f"step-{stopped:08d}"
    closing = out.strip().splitlines()[-1]
    assert re.fullmatch(rf"stopped by Ctrl-C \(SIGINT\) at step {stopped}/2000 \| \S+ \| final training loss "
                        rf"\d+\.\d{{4}} \(no validation run\) \| checkpoint {re.escape(str(ckpt))}; run the same "
                        r"command again to resume", closing), closing
    assert (ckpt / "COMPLETE").exists()

    # Resume (in this process: stdout captured, not a terminal) and finish 2 steps later, with an
    # offline W&B run on (the trainer's wiring of trackers; their own test is test_trackers.py).
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert main([*args, "--train.steps", str(stopped + 2), "--metrics.wandb", "true"]) == 0
    out = capsys.readouterr().out
    from tests.trainer.wandb_reader import wandb_records
    logged = [{i.key or ".".join(i.nested_key): i.value_json for i in r.history.item} for r in wandb_records(run)
              if r.WhichOneof("record_type") == "history"]
    assert [int(h["_step"]) for h in logged if "loss" in h] == [stopped + 1, stopped + 2]
    assert f"resumed from {ckpt} at step {stopped}" in out
    lines = out.strip().splitlines()
    assert [int(m.group(1)) for m in map(STEP_LINE.fullmatch, lines) if m] == [stopped + 1, stopped + 2]
    assert re.fullmatch(rf"step {stopped + 2}/{stopped + 2} \| val loss \d+\.\d{{4}} \| val ppl \S+", lines[-2])
    final = run / "checkpoints" / f"step-{stopped + 2:08d}"
    assert re.fullmatch(rf"done: {stopped + 2}/{stopped + 2} steps \| \S+ \| final validation loss \d+\.\d{{4}} "
                        rf"\(ppl \S+\) \| checkpoint {re.escape(str(final))}", lines[-1]), lines[-1]

    # Again: the run is complete; it says so and how to go on, trains nothing, exits 0.
    summary = (run / "summary.json").read_text()
    assert main([*args, "--train.steps", str(stopped + 2)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == (f"run {run} is already complete (checkpoint {final}); nothing to do. To train on, raise "
                       f"train.steps: --train.steps {2 * (stopped + 2)} (the LR schedule is recomputed for the new "
                       "length), or start over with --run.overwrite true")
    assert (run / "summary.json").read_text() == summary


def test_version_print_config_and_dry_run(tmp_path, capsys):
    assert main(["--version"]) == 0
    assert re.fullmatch(r"meshformer \S+ \(torch \S+, Python \d+\.\d+\.\d+\)\n", capsys.readouterr().out)

    run = tmp_path / "run"
    args = ["train", "--config", "configs/tiny.toml", *TINY, "--run.dir", str(run)]
    assert main([*args, "--optim.lr", "1e-3", "--print-config"]) == 0
    printed = tomllib.loads(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 1e-3 and printed["model"]["dim"] == 32 and printed["run"]["dir"] == str(run)
    assert set(printed) == {"run", "model", "train", "optim", "data", "parallel", "precision", "checkpoint",
                            "metrics", "launch"}

    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"dry run: built the model \(\d+\.\d\dM parameters\), the layout \(pp 1 x dp_replicate 1 x "
                     r"dp_shard 1 x tp 1 on world 1\), the optimizer and the data loaders, and read a batch of "
                     rf"\(2, 16\) tokens; stopping before step 1 \(nothing written to {re.escape(str(run))}\)", out), out
    assert not run.exists()


def test_second_ctrl_c_aborts_at_once_and_torchruns_copy_of_the_first_does_not(monkeypatch):
    # what close() must restore: Python's default handler, or SIG_IGN when the tests were started
    # as a background job of a non-interactive shell (which starts its children ignoring SIGINT)
    before = signal.getsignal(signal.SIGINT)
    p = Preemption(SimpleNamespace(distributed=False, is_main=True))
    p.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert p.requested and p.signal_name == "SIGINT"
        os.kill(os.getpid(), signal.SIGINT)          # at once: torchrun forwarding the same Ctrl-C
        monkeypatch.setattr(preemption, "REPEAT_GAP_S", 0.0)
        time.sleep(0.01)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)      # a second Ctrl-C
            time.sleep(1)                            # (the handler runs between bytecodes)
    finally:
        p.close()
    assert signal.getsignal(signal.SIGINT) is before


def test_interrupted_cli_says_nothing_was_saved_and_exits_130(monkeypatch, tmp_path, capsys):
    import trainer.train

    def interrupted(cfg, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(trainer.train, "train", interrupted)
    assert main(["train", *TINY, "--run.dir", str(tmp_path / "r")]) == 130
    err = capsys.readouterr().err
    assert err.startswith("meshformer train: interrupted by Ctrl-C; nothing saved") and err.count("\n") == 1
