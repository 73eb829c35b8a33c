import os
import shutil
import tempfile
from pathlib import Path

import pytest

from scaling.cli import main
from scaling.spec import load_spec
from scaling.store import ResultsStore

from .helpers import write_spec
from .local_slurm import LocalSlurm, why_not


@pytest.fixture(scope="module")
def slurm():
    reason = why_not()
    if reason:
        pytest.skip(reason)
    d = Path(tempfile.mkdtemp(prefix="sweep-slurm-"))   # not under pytest's 0700 folder: munged must reach it
    s = LocalSlurm(d)
    try:
        s.start()
    except BaseException:
        s.stop()
        raise
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(s.conf)
    yield s
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old
    s.stop()
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.slow
def test_sweep_as_slurm_job_arrays(slurm, tmp_path, capsys):
    spec_path = write_spec(tmp_path, replace={"compare_from_scratch = true": "compare_from_scratch = false"})
    spec = load_spec(spec_path)
    assert main(["run", str(spec_path), "--slurm", "--jobs", "2", "--wait"]) == 0
    out = capsys.readouterr().out
    assert "submitted stage 0: 4 runs" in out and "submitted stage 1: 12 runs" in out
    script = (spec.out_dir / "slurm" / "array-stage1.sbatch").read_text()
    assert "#SBATCH --array=0-11%2" in script
    rows = ResultsStore(spec.results_path).rows()
    assert len(rows) == 16 and all(r["status"] == "done" for r in rows), \
        [(r["run_id"], r["status"], r["error"]) for r in rows if r["status"] != "done"]
    jobs = {r["slurm_job"].split("_")[0] for r in rows}
    assert len(jobs) == 2 and all(r["slurm_job"].split("_")[1].isdigit() for r in rows)
    # every task ran inside Slurm and left its log
    assert len(list((spec.out_dir / "slurm").glob("*.out"))) == 16
    # re-running submits nothing
    assert main(["run", str(spec_path), "--slurm", "--jobs", "2", "--wait"]) == 0
    assert "0 runs to submit, 16 skipped" in capsys.readouterr().out
    assert main(["collect", str(spec_path)]) == 0 and main(["fit", str(spec_path), "--top-k", "8"]) == 0
    assert main(["plot", str(spec_path)]) == 0
    assert (spec.out_dir / "plots" / "isoflop.png").exists()


@pytest.mark.slow
def test_tiny_sweep_of_the_real_trainer_as_slurm_job_arrays(slurm, tmp_path, capsys):
    """The tiny sweep (3 budgets x 4 sizes, cooldown branches) with the real trainer in Slurm array tasks."""
    import json
    import sys
    replace = {"compare_from_scratch = true": "compare_from_scratch = false",
               "budgets = [6e9, 1.2e10, 2.4e10]": "budgets = [3e9, 6e9, 1.2e10]"}
    spec_path = write_spec(tmp_path, trainer=[sys.executable, "-m", "trainer", "train"], replace=replace)
    spec = load_spec(spec_path)
    assert main(["run", str(spec_path), "--slurm", "--jobs", "2", "--wait"]) == 0
    rows = ResultsStore(spec.results_path).rows()
    assert len(rows) == 16 and all(r["status"] == "done" for r in rows), \
        [(r["run_id"], r["status"], r["error"]) for r in rows if r["status"] != "done"]
    assert sum(r["kind"] == "branch" for r in rows) == 12 and all(r["slurm_job"] for r in rows)
    for r in rows:
        summary = json.loads((spec.out_dir / "runs" / r["run_id"] / "summary.json").read_text())
        assert r["n_params"] == summary["n_params"] and 0 < summary["final_val_loss"] < 6.0
    capsys.readouterr()
    assert main(["run", str(spec_path), "--slurm", "--jobs", "2", "--wait"]) == 0
    assert "0 runs to submit, 16 skipped" in capsys.readouterr().out
    assert main(["collect", str(spec_path)]) == 0 and main(["fit", str(spec_path), "--top-k", "8"]) == 0
    assert main(["plot", str(spec_path)]) == 0
    assert (spec.out_dir / "plots" / "isoflop.png").exists()
