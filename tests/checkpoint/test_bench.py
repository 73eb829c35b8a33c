"""bench/checkpoint_bench.py runs end to end on a tiny model (figures from a run this small mean
nothing; the real run is documented in trainer/CHECKPOINTS.md)."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))


def test_checkpoint_bench_prints_both_ratios(capsys, tmp_path):
    import checkpoint_bench
    assert checkpoint_bench.main(["--dim", "32", "--layers", "1", "--vocab", "256", "--seq", "16", "--saves", "3",
                                  "--repeats", "1", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "throughput ratio DCP/torch.save" in out and "time lost to async saves" in out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["saves"] == 3 and result["dcp_save_s"] > 0 and result["sync_cost_s"] != 0
    low, high = result["fraction_95ci"]
    assert low <= high
    assert not list(tmp_path.iterdir())          # its temporary folder is gone
