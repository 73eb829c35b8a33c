"""fp8 (torchao) through the real trainer: parallel/apply.py's parallelize() (which calls
convert_for_training), DistEngine and post_optimizer_hook, with DDP x2, FSDP x2, TP x2 (with
sequence parallel) and PP x2 on gloo,
against a single-process fp8 run. Uses the N-D parity harness (tests/parallel/layouts.py)."""
import pytest

from tests.parallel.test_parity import STEPS, launch, run_layout

FP8 = "--precision.dtype fp8"
LAYOUTS = {
    "fsdp2_fp8": f"--parallel.dp_shard 2 {FP8}",
    "fsdp2_fp8_all_gather": f"--parallel.dp_shard 2 {FP8} --precision.fp8_fsdp_all_gather true",
    "ddp2_fp8": f"--parallel.dp_replicate 2 --parallel.dp_shard 1 {FP8}",
    "tp2_sp_fp8": f"--parallel.tp 2 {FP8}",          # converted after TP: sharded layers, SP norms
    "pp2_fp8": f"--parallel.pp 2 {FP8}",
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return run_layout(str(tmp_path_factory.mktemp("ref") / "single_fp8"), FP8.split())


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return launch(2, LAYOUTS, tmp_path_factory.mktemp("fp8"), timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_fp8_layout_matches_single_process_fp8(name, results, reference):
    got = results[name]
    assert "error" not in got, got.get("error")
    assert len(got["loss"]) == STEPS and reference["loss"][-1] < reference["loss"][0]
    # activation scales are per rank (each sees half the batch): close, not bit-equal
    assert got["loss"] == pytest.approx(reference["loss"], rel=1e-3)
    assert got["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-3)
