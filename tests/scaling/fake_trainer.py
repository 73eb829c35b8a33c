"""A stand-in for `python -m trainer train` with the same CLI and outputs (config.toml,
metrics.jsonl, checkpoints/step-*/COMPLETE, summary.json) whose loss follows a known law, so the
sweep machinery is tested in seconds. FAKE_FAIL=<substring of run.dir> makes matching runs fail;
FAKE_IGNORE_INIT=1 emulates a trainer that ignores checkpoint.init_from. Like the trainer, it
resumes a run folder from its newest complete checkpoint; FAKE_PREEMPT_AT=<step> makes a first
attempt (one that did not resume) wait at that step for SIGUSR1, then save there, write the
PREEMPTED marker and exit with 75 (EXIT_PREEMPTED), as the trainer does on Slurm's warning."""
import json
import os
import signal
import sys
import time
import tomllib
import zlib
from pathlib import Path

import tomli_w

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from core.model_config import known_tokenizer_ids, padded_vocab  # noqa: E402
from scaling.model_size import active_numbers, model_numbers  # noqa: E402
from scaling.plan import set_dotted, step_dir_name  # noqa: E402

LAW = dict(E=2.0, A=20.0, B=13.3, alpha=0.35, beta=0.35)   # N*(C) ~ 1.8 (C/6)^0.5: inside the tiny sizes
BRANCH_PENALTY = 0.002


def main(argv):
    assert argv[0] == "--config", argv
    cfg = tomllib.loads(Path(argv[1]).read_text())
    for key, value in zip(argv[2::2], argv[3::2]):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
        set_dotted(cfg, key.removeprefix("--"), value)
    run_dir = Path(cfg["run"]["dir"])
    if os.environ.get("FAKE_FAIL") and os.environ["FAKE_FAIL"] in str(run_dir):
        print("fake failure", file=sys.stderr)
        return 3
    t, m = cfg["train"], cfg["model"]
    if not m.get("vocab_size"):   # 0 = auto, resolved as the real trainer's config loading does
        m["vocab_size"] = padded_vocab(known_tokenizer_ids(cfg.get("data", {}).get("tokenizer", "bytes")))
    n_all, n_all_ne, fpt = model_numbers(m, t["seq_len"])
    n, n_ne = active_numbers(m)          # the law is in active parameters (= all of them when dense)
    tps = t["batch_size"] * t.get("grad_accum", 1) * t["seq_len"]
    ck = cfg.get("checkpoint", {})
    start = 0
    if ck.get("init_from") and not os.environ.get("FAKE_IGNORE_INIT"):
        src = Path(ck["init_from"])
        if not (src / "COMPLETE").exists():
            print(f"no checkpoint at {src}", file=sys.stderr)
            return 4
        start = int(src.name.split("-")[1])
    own = sorted((run_dir / "checkpoints").glob("step-*/COMPLETE"))
    resumed = bool(own) and not cfg["run"].get("overwrite")
    if resumed:
        start = int(own[-1].parent.name.split("-")[1])
        print(f"resumed at step {start}")
    elif (run_dir / "metrics.jsonl").exists() and not cfg["run"].get("overwrite"):
        print("run dir holds a run", file=sys.stderr)
        return 5
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "PREEMPTED").unlink(missing_ok=True)
    (run_dir / "config.toml").write_text(tomli_w.dumps(cfg))
    d = t["steps"] * tps
    noise = 1 + 0.0005 * ((zlib.crc32(f"{n}-{d}-{cfg['run']['seed']}".encode()) % 1000) / 500 - 1)
    loss = (LAW["E"] + LAW["A"] / n ** LAW["alpha"] + LAW["B"] / d ** LAW["beta"]) * noise
    loss += BRANCH_PENALTY * bool(ck.get("init_from") and start)
    preempt_at = 0 if resumed else int(os.environ.get("FAKE_PREEMPT_AT", "0"))
    got = []
    if preempt_at:
        signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
    with (run_dir / "metrics.jsonl").open("a" if resumed else "w") as f:
        for s in range(start + 1, t["steps"] + 1):
            f.write(json.dumps({"step": s, "loss": loss + 1.0 / s, "tokens": s * tps}) + "\n")
            if s in ck.get("at_steps", []) or s == preempt_at:
                (run_dir / "checkpoints" / step_dir_name(s)).mkdir(parents=True, exist_ok=True)
                (run_dir / "checkpoints" / step_dir_name(s) / "COMPLETE").write_text("")
            if s == preempt_at:
                f.flush()
                (run_dir / "waiting-for-signal").write_text(str(os.getpid()))
                deadline = time.monotonic() + 60
                while not got and time.monotonic() < deadline:
                    time.sleep(0.05)
                if not got:
                    print("FAKE_PREEMPT_AT: no SIGUSR1 came within 60 s", file=sys.stderr)
                    return 6
                (run_dir / "PREEMPTED").write_text(json.dumps({"step": s, "exit_code": 75}))
                (run_dir / "summary.json").write_text(json.dumps({"steps": s, "preempted": True}))
                print(f"SIGUSR1: saved step {s}; exiting with code 75")
                return 75
        f.write(json.dumps({"step": t["steps"], "val_loss": loss + 0.01}) + "\n")
    (run_dir / "summary.json").write_text(json.dumps({
        "final_loss": loss, "final_val_loss": loss + 0.01, "steps": t["steps"], "tokens": d,
        "wall_s": 0.01, "n_params": n_all, "n_params_non_embedding": n_all_ne, "flops_per_token": fpt,
        "n_params_active": n, "n_params_active_non_embedding": n_ne,
        "preempted": False}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
