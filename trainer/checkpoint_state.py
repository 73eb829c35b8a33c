"""What goes into a checkpoint and how it comes back, independent of the parallel layout.

Model and optimizer go through DCP's state-dict API, which turns FSDP/TP DTensors into global
tensors sharded however the current layout holds them; the optimizer state is *flattened*
(keys `state.<fqn>.exp_avg`), so keys do not depend on parameter order
or on how a pipeline split the model: a list of model parts (pipeline stages) writes the same
keys as the single-process model, and any layout can read them back.
"""
from __future__ import annotations

import contextlib
import pickle
import random
import warnings
from dataclasses import fields
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from core.errors import CheckpointError
from core.model_config import ModelConfig
from trainer import checkpoint_files as files
from trainer.model import Transformer
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
    set_optimizer_state_dict)

OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)

# The optimizer's hyperparameters (the flattened `param_groups.<fqn>.lr|betas|eps|...` entries)
# are not saved: a resumed run takes them from its own config, as it already does for the LR
# (recomputed from the schedule). Saved, they were ~12 scalars per parameter, three quarters of
# a checkpoint's entries, and every entry costs the writer Python time that competes with
# training during a background save. Checkpoints that hold them (format 1) still load.
HYPERPARAMETERS = "param_groups."



def as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


class ModelParts:
    """The model (one module, or the stage modules of a pipeline rank) and its optimizer(s).

    Pipeline stages come either as a list of modules with one optimizer each (torchtitan's way:
    DCP maps an optimizer's parameters to FQNs through one module), or as one nn.ModuleList
    with one optimizer over it (parallel/'s way), whose keys carry the list index ("0.layers.3...");
    the index is dropped on save and put back on load. Either way the checkpoint holds the
    single-process FQNs, so it does not depend on how a pipeline split the model."""

    def __init__(self, model, optimizer=None):
        self.container = model if isinstance(model, nn.ModuleList) else None
        self.parts: list[nn.Module] = list(model) if self.container is not None else as_list(model)
        self.optimizers = as_list(optimizer)
        want = (0, 1) if self.container is not None else (0, len(self.parts))
        if len(self.optimizers) not in want:
            raise ValueError(f"checkpoint: {len(self.optimizers)} optimizers for {len(self.parts)} model parts; "
                             "give one optimizer per model part (or one over an nn.ModuleList of parts)")
        self._index: dict[str, str] = {}      # FQN -> list index, for a ModuleList

    def _modules(self):
        """(module, optimizer-or-None) pairs that DCP's state-dict API is called on."""
        if self.container is not None:
            return [(self.container, self.optimizers[0] if self.optimizers else None)]
        opts = self.optimizers or [None] * len(self.parts)
        return list(zip(self.parts, opts))

    def _strip(self, sd: dict, optim: bool) -> dict:
        if self.container is None:
            return sd
        out = {}
        for key, v in sd.items():
            if optim:
                kind, rest = key.split(".", 1)
                idx, fqn = rest.split(".", 1)
                out[f"{kind}.{fqn}"] = v
            else:
                idx, fqn = key.split(".", 1)
                self._index[fqn] = idx
                out[fqn] = v
        return out

    def _unstrip(self, sd: dict, optim: bool) -> dict:
        if self.container is None:
            return sd
        if not self._index:
            self.model_state_dict()
        out = {}
        for key, v in sd.items():
            if optim:
                kind, rest = key.split(".", 1)
                fqn = rest.rsplit(".", 1)[0]           # flattened keys end in one dot-free name
                out[f"{kind}.{self._index[fqn]}.{rest}"] = v
            elif key in self._index:
                out[f"{self._index[key]}.{key}"] = v
        return out

    def model_state_dict(self) -> dict:
        sd = {}
        for module, _ in self._modules():
            sd.update(get_model_state_dict(module, options=OPTIONS))
        return self._strip(sd, optim=False)

    def optim_state_dict(self) -> dict:
        sd = {}
        for module, opt in self._modules():
            sd.update(get_optimizer_state_dict(module, opt, options=OPTIONS))
        return self._strip(sd, optim=True)

    def state_dict(self, with_optim: bool = True) -> dict:
        """What a checkpoint holds: model tensors and the optimizer's state tensors."""
        out = {"model": self.model_state_dict()}
        if with_optim and self.optimizers:
            out["optim"] = {k: v for k, v in self.optim_state_dict().items() if not k.startswith(HYPERPARAMETERS)}
        return out

    def load_state_dict(self, sd: dict) -> None:
        model_sd = self._unstrip(sd["model"], optim=False)
        optim_sd = None
        if "optim" in sd:
            hyper = {k: v for k, v in self.optim_state_dict().items() if k.startswith(HYPERPARAMETERS)}
            optim_sd = self._unstrip({**hyper, **sd["optim"]}, optim=True)
        for module, opt in self._modules():
            keys = _keys(module)
            set_model_state_dict(module, {k: v for k, v in model_sd.items() if k in keys}, options=OPTIONS)
            if optim_sd is not None:
                set_optimizer_state_dict(module, opt, optim_sd, options=OPTIONS)


def _keys(part: nn.Module) -> set[str]:
    return set(get_model_state_dict(part, options=StateDictOptions()).keys())


# ---- what the config expects ----------------------------------------------------------------

def expected_model_shapes(model_cfg) -> dict[str, tuple]:
    """FQN -> global shape of the single-process model for this config (built on the meta
    device: no memory, no init cost). Resharding never changes these."""
    with torch.device("meta"):
        model = Transformer(model_cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# Model config fields that do not change what the weights mean. The RoPE scaling keys among them:
# context extension continues a checkpoint trained at rope_original_max_len with longer sequences
# and stretched rotary frequencies (no weight changes shape; the model adapts in the new steps).
ROPE_SCALING_FIELDS = {"rope_scaling", "rope_factor", "rope_original_max_len", "rope_low_freq_factor",
                       "rope_high_freq_factor", "rope_beta_fast", "rope_beta_slow", "rope_attention_factor"}
HARMLESS_MODEL_FIELDS = {"init_std", "max_seq_len", *ROPE_SCALING_FIELDS}


def model_config_diff(saved: dict, current: dict) -> list[str]:
    """The model fields that differ. A key a checkpoint lacks was written before that option
    existed, when the model behaved as its default does (new options default to off)."""
    defaults = {f.name: f.default for f in fields(ModelConfig)}
    saved = {**{k: v for k, v in defaults.items() if k in current}, **saved}
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if key in HARMLESS_MODEL_FIELDS and not (key == "max_seq_len" and current.get("position") == "learned"):
            continue
        if key.startswith("rel_") and current.get("position") != "relative":   # unused (older checkpoints lack them)
            continue
        if key == "eot_id" and not current.get("doc_mask"):    # read only by document masking
            continue
        if saved.get(key) != current.get(key):
            diffs.append(f"model.{key}: checkpoint has {saved.get(key)!r}, this run has {current.get(key)!r}")
    return diffs


def check_against_metadata(path: Path, metadata, model_cfg, with_optim: bool) -> None:
    """Compare the checkpoint's tensor keys and global shapes with the model this config builds;
    raise naming every missing, unexpected or mis-shaped tensor (never a silent partial load)."""
    saved = {k[len("model."):]: tuple(v.size) for k, v in metadata.state_dict_metadata.items()
             if k.startswith("model.") and hasattr(v, "size")}
    want = expected_model_shapes(model_cfg)
    problems = [f"missing in the checkpoint: {k} {list(s)}" for k, s in want.items() if k not in saved]
    problems += [f"not in this model: {k} {list(s)}" for k, s in saved.items() if k not in want]
    problems += [f"shape of {k}: checkpoint {list(saved[k])}, this model {list(s)}"
                 for k, s in want.items() if k in saved and saved[k] != s]
    if with_optim and not any(k.startswith("optim.") for k in metadata.state_dict_metadata):
        problems.append("the checkpoint holds no optimizer state")
    if problems:
        shown = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12 else [])
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit this model:\n  " + "\n  ".join(shown))


# ---- safe loading ---------------------------------------------------------------------------
# What a checkpoint may contain is trusted only this far (CHECKPOINTS.md, "Untrusted input"):
# the `.metadata` pickle may name exactly the classes below (DCP's metadata records, torch's
# dtypes and sizes, paths), each entry the run loads must be declared a tensor, and its shard a
# plain file inside the checkpoint folder. Tensor data goes through torch.load(weights_only=True)
# in DCP's reader. Nothing is ever unpickled freely: a non-tensor ("bytes") entry would be, by
# DCP's default planner, so SafeLoadPlanner refuses them.

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_SAFE_GLOBALS = frozenset({
    *((_DCP_METADATA, n) for n in ("Metadata", "StorageMeta", "MetadataIndex", "ChunkStorageMetadata",
                                   "TensorProperties", "TensorStorageMetadata", "BytesStorageMetadata",
                                   "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),
    ("pathlib._local", "PosixPath"), ("pathlib._local", "WindowsPath"),          # Python 3.13's pathlib
})
_TORCH_ENUMS = (torch.dtype, torch.layout, torch.memory_format)


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a pickle: admit only the exact (module, name) pairs above and torch's
    dtype/layout/memory-format constants, so a crafted file cannot call anything on load. Exact
    pairs, not module prefixes: pickle resolves a dotted name ("os.system") as attributes of an
    admitted module, which would reach any callable that module imports."""

    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and "." not in name and isinstance(getattr(torch, name, None), _TORCH_ENUMS):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from checkpoint metadata")


def _check_storage_files(metadata) -> None:
    """Every shard the metadata points to is a plain file name inside the checkpoint folder (no
    '../x', no absolute path), read at a non-negative offset."""
    for index, info in (getattr(metadata, "storage_data", None) or {}).items():
        rel = str(getattr(info, "relative_path", ""))
        offset, length = getattr(info, "offset", 0), getattr(info, "length", 0)
        if not rel or rel != Path(rel).name or rel in (".", "..") or not isinstance(offset, int) \
                or not isinstance(length, int) or offset < 0 or length < 0:
            raise pickle.UnpicklingError(f"refusing shard location {rel!r} (offset {offset!r}, length {length!r}) "
                                         f"for {getattr(index, 'fqn', index)}: shards are files in the checkpoint folder")


class SafeFileSystemReader(dcp.FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        rank = kwargs.get("rank")
        get_path = getattr(self, "_get_metadata_path", None)        # torch < 2.12 has no per-rank metadata
        path = get_path(rank) if get_path else self.fs.concat_path(self.path, ".metadata")
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        _check_storage_files(metadata)
        from torch.distributed.checkpoint.metadata import StorageMeta
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner for a state dict of tensors only: every entry this run asks for must be
    declared a tensor in the checkpoint, and bytes are never unpickled (DCP's default would pass
    them to torch.load(weights_only=False), which runs whatever the file says)."""

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
        super().set_up_planner(state_dict, metadata, is_coordinator)
        entries = metadata.state_dict_metadata if metadata is not None else {}
        for key, value in self.state_dict.items():
            kind = entries.get(key)
            if isinstance(value, torch.Tensor) and kind is not None and not isinstance(kind, TensorStorageMetadata):
                raise CheckpointError(f"checkpoint entry {key!r} is stored as {type(kind).__name__}, not a tensor: "
                                      "refusing to load it (meshformer checkpoints hold only tensors)")

    def load_bytes(self, read_item, value) -> None:
        raise CheckpointError(f"checkpoint entry {read_item.dest_index.fqn!r} holds pickled bytes: refusing to "
                              "unpickle it (meshformer checkpoints hold only tensors)")


class CheckpointWriter(dcp.FileSystemWriter):
    """DCP's file writer (one file per rank, fsync'd) that also records the size and CRC32 of
    every file this rank wrote (its shards and `records`, its JSON files), and on the coordinator
    of .metadata (checkpoint_files, "checksums"), so a damaged checkpoint is found before it is
    loaded. It skips the zip CRC32 that torch.save computes for every record: torch.load, and so
    DCP's reader, never checks it, and computing it holds the GIL: ~0.6 s per GB here, a third of
    a save, and during a background save the training thread waits for the GIL meanwhile. The
    switch is torch's process-wide option, turned off only while this writer writes (no other
    torch.save runs then in a training process; one that did would still load)."""

    def __init__(self, path: str, *, rank: int = 0, world_size: int = 1, records=()):
        super().__init__(path)
        self._rank, self._world_size, self._records = rank, world_size, [Path(r).name for r in records]

    def write_data(self, plan, planner):
        before = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(False)
        try:
            future = super().write_data(plan, planner)
            results = future.wait()
        finally:
            torch.serialization.set_crc32_options(before)
        shards = {str(r.storage_data.relative_path) for r in results}
        files.write_checksums(Path(self.path), files.CHECKSUMS_RANK.format(self._rank), [*shards, *self._records])
        return future

    def finish(self, metadata, results) -> None:
        super().finish(metadata, results)
        files.write_checksums(Path(self.path), files.CHECKSUMS_METADATA, [".metadata"],
                              extra={"world_size": self._world_size})


def read_metadata(path: Path):
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} has no DCP .metadata file: not a (complete) checkpoint")
    try:
        return SafeFileSystemReader(str(path)).read_metadata()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"checkpoint {str(path)!r}: {e}") from None


@contextlib.contextmanager
def single_process_quiet():
    """DCP warns on every call without a process group that it 'assumes a single process': that is
    exactly what a one-process run intends, so the warning is noise there (and only there)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def dcp_load(sd: dict, path: Path, process_group=None) -> None:
    """Load the tensors of `sd` from a checkpoint folder, trusting it no further than the metadata
    allow-list, tensor-only entries and in-folder shards (see "safe loading" above)."""
    with single_process_quiet():
        try:
            dcp.load(sd, storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner(),
                     process_group=process_group)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"checkpoint {str(path)!r}: {e}") from None
        except CheckpointException as e:            # DCP gathers each rank's failure: re-raise ours as is
            ours = [exc for exc, _ in e.failures.values() if isinstance(exc, (CheckpointError, pickle.UnpicklingError))]
            if ours:
                raise CheckpointError(f"checkpoint {str(path)!r}: {ours[0]}") from None
            raise


# ---- RNG ------------------------------------------------------------------------------------

def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state().tolist(), "python": _py_state_to_json(random.getstate())}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device).tolist()
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "python" in state:
        random.setstate(_py_state_from_json(state["python"]))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8), device)


def _py_state_to_json(s):
    return [s[0], list(s[1]), s[2]]


def _py_state_from_json(s):
    return (s[0], tuple(s[1]), s[2])
