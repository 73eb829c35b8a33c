"""`meshformer plan` / `python -m parallel.planner`: search, predict, overrides round trip, errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from parallel.planner.cli import main
from parallel.planner.run_config import config_layout, read_run_config

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "llama3-8b.toml"


def _winner_overrides(out: str) -> list[str]:
    lines = out.splitlines()
    return lines[lines.index("winner as config overrides:") + 1].split()


def test_search_prints_table_and_winner_that_loads_back(capsys):
    assert main(["--config", str(CONFIG), "--cluster", "h100-sxm", "--gpus", "64", "--global-batch", "256", "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "#1:" in out
    overrides = _winner_overrides(out)
    # the printed winner, applied to the config, is a layout the predictor agrees fits and is #1
    run = read_run_config(str(CONFIG), overrides)
    layout = config_layout(run, 64)
    assert layout.global_batch == 256
    assert main(["predict", "--config", str(CONFIG), "--cluster", "h100-sxm", "--gpus", "64", *overrides]) == 0
    pred = json.loads(capsys.readouterr().out)
    assert pred["fits"] and pred["layout"] == layout.to_dict()
    assert main(["--config", str(CONFIG), "--cluster", "h100-sxm", "--gpus", "64", "--global-batch", "256",
                 "--top", "3", "--json"]) == 0
    ranked = json.loads(capsys.readouterr().out)
    assert ranked[0]["layout"] == pred["layout"] and ranked[0]["tokens_per_s"] == pytest.approx(pred["tokens_per_s"])
    assert ranked[0]["tokens_per_s"] >= ranked[1]["tokens_per_s"] >= ranked[2]["tokens_per_s"]


def test_predict_json_figures_are_consistent(capsys):
    args = ["predict", "--config", str(CONFIG), "--cluster", "h200", "--gpus", "16",
            "--parallel.tp", "8", "--parallel.dp_shard", "2", "--train.batch_size", "2"]
    assert main(args) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["gpus"] == 16 and d["global_batch"] == 4
    assert d["tokens_per_s"] == pytest.approx(4 * 8192 / d["step_s"])
    assert d["mfu"] == pytest.approx(d["model_tflops_per_gpu"] / 989.4, rel=1e-6)
    assert "--parallel.tp 8" in d["overrides"]


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "parallel.planner", "predict", "--config", str(CONFIG),
                           "--cluster", "b200", "--gpus", "8"], cwd=ROOT, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["cluster"] == "b200"


@pytest.mark.parametrize("args, message", [
    (["--cluster", "nosuch", "--gpus", "8"], "cluster profile 'nosuch' not found"),
    (["--cluster", "a100-80gb", "--gpus", "8", "--precision.dtype", "fp8"], "no fp8"),
    (["--cluster", "a100-80gb", "--gpus", "1"], "no layout of this model fits"),
    (["--cluster", "a100-80gb", "--gpus", "8", "--parallel.tpp", "2"], "tpp"),
])
def test_bad_input_names_the_problem(capsys, args, message):
    assert main(["--config", str(CONFIG), *args]) == 2
    assert message in capsys.readouterr().err


def test_predict_rejects_layout_that_cannot_run(capsys):
    assert main(["predict", "--config", str(CONFIG), "--cluster", "h100-sxm", "--gpus", "24",
                 "--parallel.tp", "3", "--parallel.dp_shard", "8"]) == 2
    assert "parallel.tp" in capsys.readouterr().err


def test_gpu_count_that_does_not_match_the_layout_is_refused(capsys):
    assert main(["predict", "--config", str(CONFIG), "--cluster", "h100-sxm", "--gpus", "12",
                 "--parallel.tp", "8"]) == 2
    assert "not divisible by parallel.tp" in capsys.readouterr().err
