"""Damaged checkpoints: found by their checksums before anything is loaded, named in one line, and
the run resumes from the newest checkpoint that verifies (or stops, with on_corrupt = "error")."""
import json
import shutil

import pytest

from tests.checkpoint.helpers import config, losses, run
from trainer import checkpoint_files as files
from trainer.checkpoint import load_model_weights
from trainer.checkpoint_state import CheckpointError
from trainer.export import export
from trainer.model import Transformer

STEPS = ["--train.steps", "8", "--checkpoint.at_steps", "[4]"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("damaged") / "run"
    _, rows = run(d, *STEPS)
    return d, losses(rows)


def shard(ckpt):
    return next(ckpt.glob("*.distcp"))


def scribble(path):              # random bytes over the middle of a file, size unchanged
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(range(7, 7 + 64))
    path.write_bytes(bytes(data))


DAMAGE = {
    "random bytes in a shard": lambda c: scribble(shard(c)),
    "truncated shard": lambda c: shard(c).write_bytes(shard(c).read_bytes()[:1000]),
    "zeroed shard": lambda c: shard(c).write_bytes(bytes(shard(c).stat().st_size)),
    "missing shard": lambda c: shard(c).unlink(),
    "garbled train.json": lambda c: (c / "train.json").write_text('{"step": 8, "tok'),
    "missing rank-0.json": lambda c: (c / "rank-0.json").unlink(),
    "garbled .metadata": lambda c: scribble(c / ".metadata"),
    "missing checksum record": lambda c: (c / files.CHECKSUMS_RANK.format(0)).unlink(),
}
EXPECTED = {
    "random bytes in a shard": "does not match its checksum", "truncated shard": "bytes, ",
    "zeroed shard": "does not match its checksum", "missing shard": "is missing",
    "garbled train.json": "train.json has", "missing rank-0.json": "rank-0.json is missing",
    "garbled .metadata": ".metadata does not match", "missing checksum record": "checksums-rank-0.json is missing",
}


def damaged_copy(reference, tmp_path, how):
    src, _ = reference
    d = tmp_path / "run"
    shutil.copytree(src, d)
    newest = d / "checkpoints" / "step-00000008"
    DAMAGE[how](newest)
    return d, newest


@pytest.mark.parametrize("how", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(reference, tmp_path, how, capsys):
    d, newest = damaged_copy(reference, tmp_path, how)
    capsys.readouterr()
    summary, rows = run(d, "--train.steps", "8")
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "is damaged" in ln)
    assert "step-00000008" in line and EXPECTED[how] in line, line
    assert f"resumed from {d / 'checkpoints' / 'step-00000004'} at step 4" in out
    assert (newest.parent / "damaged-step-00000008").is_dir()        # kept, out of the way
    assert files.find_damage(newest) is None                         # step 8 saved anew by the resumed run
    _, want = reference
    got = losses(rows)
    assert [got[s] for s in range(5, 9)] == [want[s] for s in range(5, 9)]            # exact continuation
    assert summary["steps"] == 8


def test_on_corrupt_error_stops_and_changes_nothing(reference, tmp_path):
    d, newest = damaged_copy(reference, tmp_path, "random bytes in a shard")
    with pytest.raises(CheckpointError, match=r"step-00000008.*is damaged: __0_0\.distcp does not match"):
        run(d, "--train.steps", "8", "--checkpoint.on_corrupt", "error")
    assert newest.is_dir()


def test_no_checkpoint_verifies_is_an_error(reference, tmp_path):
    d, _ = damaged_copy(reference, tmp_path, "zeroed shard")
    scribble(shard(d / "checkpoints" / "step-00000004"))
    with pytest.raises(CheckpointError, match="none of the 2 checkpoints"):
        run(d, "--train.steps", "8")


def test_checkpoint_without_checksums_still_loads_and_its_json_is_checked(reference, tmp_path, capsys):
    """Checkpoints saved before checksums existed: loaded as they are; unreadable JSON counts as damage."""
    d, newest = damaged_copy(reference, tmp_path, "garbled train.json")
    for ckpt in (newest, d / "checkpoints" / "step-00000004"):
        for manifest in ckpt.glob("checksums-*.json"):
            manifest.unlink()
    summary, _ = run(d, "--train.steps", "8")
    assert "train.json" in capsys.readouterr().out and summary["steps"] == 8


def test_weight_loading_and_export_refuse_a_damaged_checkpoint(reference, tmp_path):
    _, newest = damaged_copy(reference, tmp_path, "random bytes in a shard")
    model = Transformer(config(tmp_path / "x").model)
    with pytest.raises(CheckpointError, match="is damaged: __0_0.distcp"):
        load_model_weights(model, newest)                 # what generate uses
    with pytest.raises(CheckpointError, match="is damaged: __0_0.distcp"):
        export(str(newest), str(tmp_path / "out"))


@pytest.mark.parametrize("mode", ["false", "true"])
def test_every_saved_file_is_checksummed_sync_and_async(tmp_path, mode):
    d = tmp_path / "run"
    run(d, "--train.steps", "2", "--checkpoint.async", mode)
    ckpt = files.complete_checkpoints(d / "checkpoints")[-1]
    recorded = set(files.checksum_manifest(ckpt))
    on_disk = {p.name for p in ckpt.iterdir()} - {files.COMPLETE, files.CHECKSUMS_METADATA,
                                                  files.CHECKSUMS_RANK.format(0)}
    assert recorded == on_disk and files.find_damage(ckpt) is None
    assert json.loads((ckpt / files.CHECKSUMS_METADATA).read_text())["world_size"] == 1
