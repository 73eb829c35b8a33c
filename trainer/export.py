"""`meshformer export`: a checkpoint as consolidated safetensors plus a Hugging Face config.

    meshformer export runs/tiny --out exports/tiny            # newest checkpoint of a run
    meshformer export runs/tiny/checkpoints/step-00000300 --out exports/tiny --dtype bfloat16

Writes OUT/model.safetensors (HF Llama tensor names) and OUT/config.json (LlamaConfig), loadable
with `LlamaForCausalLM.from_pretrained(OUT)`; and `--checkpoint.init_from OUT` starts training
from it. Shards saved under any layout are gathered by DCP into one process here.
"""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import torch

from core.cli_args import ArgParser
from core.errors import UsageError, report_errors
from trainer import checkpoint_files as files
from trainer.checkpoint_state import CheckpointError, dcp_load
from trainer.model import Transformer
from trainer.hf_llama import check_llama_shaped, hf_config, to_hf
from core.model_config import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_checkpoint(source: str) -> Path:
    """A checkpoint folder, or a run folder (its newest complete checkpoint)."""
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"{source!r} does not exist (give a run folder or a checkpoint folder)")
    if (path / "checkpoints").is_dir():
        found = files.complete_checkpoints(path / "checkpoints")
        if not found:
            raise CheckpointError(f"run folder {source!r} has no complete checkpoint under checkpoints/")
        return found[-1]
    if not files.is_complete(path):
        raise CheckpointError(f"{source!r} is not a complete checkpoint (no {files.COMPLETE} marker)")
    return path


def verified(ckpt: Path) -> Path:
    problem = files.find_damage(ckpt)
    if problem:
        raise CheckpointError(f"checkpoint {str(ckpt)!r} is damaged: {problem}")
    return ckpt


def model_config_of(ckpt: Path) -> ModelConfig:
    saved = files.read_json(ckpt / "train.json", "checkpoint")["model"]
    known = {f.name for f in fields(ModelConfig)}
    unknown = set(saved) - known
    if unknown:
        raise CheckpointError(f"{ckpt}/train.json: model fields {sorted(unknown)} are unknown to this version")
    return ModelConfig(**saved)


def consolidated_state_dict(ckpt: Path, mc: ModelConfig) -> dict:
    """The full model state dict from a sharded checkpoint (in this one process)."""
    model = Transformer(mc)
    sd = {"model": model.state_dict()}
    dcp_load(sd, ckpt)
    return sd["model"]


def export(source: str, out: str, dtype: str = "float32", force: bool = False) -> Path:
    from safetensors.torch import save_file
    ckpt = verified(resolve_checkpoint(source))
    mc = model_config_of(ckpt)
    check_llama_shaped(mc)
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out!r} is a file; give a new or empty folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise CheckpointError(f"--out {out!r} exists and is not empty; pick another folder or pass --force")
    tensors = {k: v.to(DTYPES[dtype]) for k, v in to_hf(consolidated_state_dict(ckpt, mc), mc).items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_config(mc, dtype), indent=2) + "\n")
    meta = files.read_json(ckpt / "train.json", "checkpoint")
    (out_dir / "meshformer.json").write_text(json.dumps(
        {"checkpoint": str(ckpt.resolve()), "step": meta["step"], "tokens": meta["tokens"], "model": meta["model"]},
        indent=2) + "\n")
    return out_dir


def main(argv: list[str], debug: bool = False) -> int:
    return report_errors("meshformer export", lambda: _main(argv), debug)


def _main(argv: list[str]) -> int:
    p = ArgParser(prog="meshformer export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a run folder (its newest checkpoint) or a checkpoint folder")
    p.add_argument("--out", required=True, help="output folder for model.safetensors and config.json")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out folder")
    args = p.parse_args(argv)
    out = export(args.checkpoint, args.out, args.dtype, args.force)
    print(f"exported {resolve_checkpoint(args.checkpoint)} to {out}")
    return 0
