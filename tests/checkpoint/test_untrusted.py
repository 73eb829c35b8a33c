"""Crafted checkpoints: loading one must never run code or read outside its folder.

Each test writes a checkpoint that a permissive loader would act on (run `touch MARKER`, or read
a file beside the folder), loads it the way a user would (resume, init_from, generate/export's
weight loading), and asserts the load is refused with a CheckpointError and the marker never
appears."""
import os
import pickle
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from tests.checkpoint.helpers import config, run
from trainer.checkpoint import load_model_weights
from trainer.checkpoint_state import CheckpointError, read_metadata
from trainer.model import Transformer

STEPS = ["--train.steps", "4", "--checkpoint.at_steps", "[4]"]
pytestmark = pytest.mark.filterwarnings("ignore:Detected an existing checkpoint")   # rewrite() overwrites on purpose


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("untrusted") / "run"
    run(d, *STEPS)
    return d / "checkpoints" / "step-00000004"


class RunsCode:
    """Unpickling this object runs a shell command (what an attacker's pickle would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def copy_run(saved, tmp_path):
    """A run folder holding a copy of the saved checkpoint, to resume from."""
    d = tmp_path / "run"
    shutil.copytree(saved.parents[1], d)
    return d, d / "checkpoints" / saved.name


def tensors_of(ckpt) -> dict:
    """Every tensor of a checkpoint, flat ("model.x", "optim.state.x.exp_avg"), read with DCP."""
    meta = read_metadata(ckpt)
    sd = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.state_dict_metadata.items()
          if isinstance(m, TensorStorageMetadata)}
    dcp.load(sd, checkpoint_id=str(ckpt), no_dist=True)
    return sd


def rewrite(ckpt, replace: dict) -> None:
    """The checkpoint's tensors with some entries replaced, written back by plain DCP into the same
    folder (train.json, rank-*.json and COMPLETE stay: it looks like a finished save)."""
    sd = tensors_of(ckpt)
    assert set(replace) <= set(sd)
    sd.update(replace)
    for f in ckpt.glob("*.distcp"):
        f.unlink()
    dcp.save(sd, checkpoint_id=str(ckpt), no_dist=True)


def resume(run_dir):
    return run(run_dir, "--train.steps", "6")


def test_optimizer_entry_stored_as_pickled_bytes_is_refused_on_resume(saved, tmp_path):
    d, ckpt = copy_run(saved, tmp_path)
    key = next(k for k in tensors_of(ckpt) if k.startswith("optim.state.") and k.endswith(".exp_avg"))
    rewrite(ckpt, {key: RunsCode(tmp_path / "pwned")})
    assert type(read_metadata(ckpt).state_dict_metadata[key]).__name__ == "BytesStorageMetadata"
    with pytest.raises(CheckpointError, match=f"{key}.*not a tensor"):
        resume(d)
    assert not (tmp_path / "pwned").exists()


def test_model_entry_stored_as_pickled_bytes_is_refused_by_weight_loading(saved, tmp_path):
    _, ckpt = copy_run(saved, tmp_path)
    rewrite(ckpt, {"model.norm.weight": RunsCode(tmp_path / "pwned")})
    model = Transformer(config(tmp_path / "x").model)
    with pytest.raises(CheckpointError):
        load_model_weights(model, ckpt)                       # what generate and export call
    assert not (tmp_path / "pwned").exists()


def stack_global_call(module: str, name: str, arg: str) -> bytes:
    """A protocol-4 pickle that looks up `module`.`name` (a dotted name is resolved attribute by
    attribute) and calls it with one string."""
    enc = lambda s: pickle.SHORT_BINUNICODE + bytes([len(s.encode())]) + s.encode()   # noqa: E731
    return (pickle.PROTO + b"\x04" + enc(module) + enc(name) + pickle.STACK_GLOBAL + enc(arg)
            + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP)


@pytest.mark.parametrize("module,name", [
    ("torch.distributed.checkpoint.filesystem", "os.system"),     # a dotted name under an admitted module
    ("torch.distributed.checkpoint.metadata", "os.system"),
    ("torch", "os.system"),                                       # under torch's dtype rule
    ("os", "system"),
    ("builtins", "eval"),
    ("torch", "load"),                                            # a torch callable, not a dtype
])
def test_metadata_naming_a_callable_is_refused(saved, tmp_path, module, name):
    d, ckpt = copy_run(saved, tmp_path)
    marker = tmp_path / "pwned"
    (ckpt / ".metadata").write_bytes(stack_global_call(module, name, f"touch {marker}"))
    with pytest.raises(CheckpointError, match="refusing to load"):
        resume(d)
    with pytest.raises(CheckpointError, match="refusing to load"):
        run(tmp_path / "branch", *STEPS, "--checkpoint.init_from", str(ckpt))
    assert not marker.exists()


def test_shard_outside_the_checkpoint_folder_is_refused(saved, tmp_path):
    d, ckpt = copy_run(saved, tmp_path)
    meta = read_metadata(ckpt)
    outside = tmp_path / "elsewhere.distcp"
    for info in meta.storage_data.values():
        shutil.copy(ckpt / info.relative_path, outside)
        info.relative_path = os.path.relpath(outside, ckpt)          # "../../elsewhere.distcp"
    meta.storage_meta = None
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(meta, f)
    with pytest.raises(CheckpointError, match="refusing shard location"):
        resume(d)


def test_an_untouched_checkpoint_still_resumes(saved, tmp_path):
    d, _ = copy_run(saved, tmp_path)
    summary, _ = resume(d)
    assert summary["steps"] == 6
