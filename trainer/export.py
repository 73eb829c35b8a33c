"""`meshformer export`: a run as a Hugging Face model folder, weights and tokenizer.

    meshformer export runs/tiny exports/tiny                            # the run folder is enough
    meshformer export runs/tiny exports/tiny --checkpoint step-400 --dtype bfloat16
    meshformer export runs/tiny/checkpoints/step-00000300 exports/tiny  # a checkpoint folder
    meshformer export --config configs/tiny.toml exports/tiny [--section.key value ...]

Writes OUT/model.safetensors (HF Llama tensor names; MoE models: Mixtral, Qwen2-MoE or Glm4-MoE, chosen
in trainer/hf_moe.py), config.json (LlamaConfig or the MoE format's),
generation_config.json (stops at end-of-text) and the tokenizer (tokenizer.json,
tokenizer_config.json, special_tokens_map.json; trainer/hf_tokenizer.py), so
`AutoModelForCausalLM.from_pretrained(OUT)`, `AutoTokenizer.from_pretrained(OUT)` and
`pipeline("text-generation", model=OUT)` work; `--checkpoint.init_from OUT` starts training from
it. Shards saved under any layout are gathered by DCP into one process here.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

import torch

from core.cli_args import ArgParser, split_overrides
from core.errors import UsageError, report_errors
from core.model_config import ModelConfig
from core.run_config import Config, load_config
from trainer import checkpoint_files as files
from trainer.checkpoint_state import CheckpointError, dcp_load
from trainer.hf_moe import check_exportable, hf_config_any, to_hf_any
from trainer.hf_tokenizer import generation_config, write_hf_tokenizer
from trainer.model import Transformer
from trainer.run_folder import CONFIG_NAME, describe, load_run_config, pick_checkpoint, run_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_checkpoint(source: str, choice: str | None = None) -> Path:
    """A checkpoint folder, or a run folder (its newest complete checkpoint, or --checkpoint's)."""
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"{source!r} does not exist (give a run folder or a checkpoint folder)")
    if (path / "checkpoints").is_dir() or (path / CONFIG_NAME).is_file():
        return pick_checkpoint(path, choice)
    if choice is not None:
        raise UsageError(f"--checkpoint {choice}: {source!r} is not a run folder (no checkpoints/ in it); "
                         "give the run folder, or the checkpoint folder alone")
    if not files.is_complete(path):
        raise CheckpointError(f"{source!r} is not a complete checkpoint (no {files.COMPLETE} marker); give a run "
                              "folder or one of its checkpoints/step-N folders")
    return path


def run_config_of(source: str) -> Config | None:
    """The config of the run a source belongs to (a run folder, or RUN/checkpoints/step-N), for
    its tokenizer; None for a checkpoint outside a run folder."""
    path = Path(source)
    for run in (path, path.parent.parent):
        if (run / CONFIG_NAME).is_file() and ((run / "checkpoints").is_dir() or run == path):
            return load_run_config(str(run), [])
    return None


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


def export(source: str, out: str, dtype: str = "float32", force: bool = False, *, checkpoint: str | None = None,
           cfg: Config | None = None) -> tuple[Path, str]:
    """Write the export; returns (the checkpoint used, what was said about the tokenizer)."""
    from safetensors.torch import save_file
    ckpt = verified(resolve_checkpoint(source, checkpoint))
    mc = model_config_of(ckpt)
    check_exportable(mc)
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out!r} is a file; give a new or empty folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise CheckpointError(f"--out {out!r} exists and is not empty; pick another folder or pass --force")
    cfg = cfg if cfg is not None else run_config_of(source)
    tok = run_tokenizer(cfg) if cfg is not None else None     # before writing: a bad tokenizer stops the export
    tensors = {k: v.to(DTYPES[dtype]) for k, v in to_hf_any(consolidated_state_dict(ckpt, mc), mc).items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_config_any(mc, dtype), indent=2) + "\n")
    meta = files.read_json(ckpt / "train.json", "checkpoint")
    (out_dir / "meshformer.json").write_text(json.dumps(
        {"checkpoint": str(ckpt.resolve()), "step": meta["step"], "tokens": meta["tokens"], "model": meta["model"]},
        indent=2) + "\n")
    if tok is None:
        return ckpt, f"no tokenizer: {source} is not in a run folder (no {CONFIG_NAME}); weights only"
    (out_dir / "generation_config.json").write_text(json.dumps(generation_config(tok.eot_id), indent=2) + "\n")
    written = write_hf_tokenizer(tok, out_dir, mc.max_seq_len)
    if not written:
        return ckpt, (f"no tokenizer files: data.tokenizer {tok.spec!r} has no Hugging Face form here "
                      "(tiktoken, or pre-tokenized shards whose tokenizer.json is not on this machine)")
    return ckpt, f"tokenizer {tok.spec} as {', '.join(written)}"


def main(argv: list[str], debug: bool = False) -> int:
    return report_errors("meshformer export", lambda: _main(argv), debug)


def _main(argv: list[str]) -> int:
    p = ArgParser(prog="meshformer export", formatter_class=argparse.RawDescriptionHelpFormatter,
                  usage="meshformer export RUN_DIR OUT [--checkpoint step-N|PATH] [--dtype DTYPE] [--force]\n"
                        "       meshformer export --config FILE OUT [--section.key value ...]",
                  description="\n\n".join(__doc__.split("\n\n")[:2]),
                  epilog="Any --section.key value pair overrides the run's config (e.g. --data.tokenizer).")
    p.add_argument("paths", nargs="*", metavar="RUN_DIR OUT",
                   help="a run folder (or one of its checkpoint folders) and the output folder; "
                        "with --config only OUT")
    p.add_argument("--out", metavar="OUT", default=None, help="the output folder, if not given as a positional")
    p.add_argument("--config", metavar="FILE", default=None,
                   help="TOML config instead of RUN_DIR: exports its run.dir (default: none)")
    p.add_argument("--checkpoint", metavar="step-N|PATH", default=None,
                   help="step-N (or N) of the run, or a checkpoint folder (default: the newest complete one)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="tensor dtype (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="write into a non-empty output folder (default: refuse)")
    own, overrides = split_overrides(argv)
    args = p.parse_args(own)
    paths = list(args.paths)
    wanted = 1 if args.config else 2
    if args.out is not None:
        paths.append(args.out)
    if len(paths) != wanted:
        raise UsageError("give " + ("the output folder: meshformer export --config FILE OUT" if args.config else
                                    "a run folder and the output folder: meshformer export RUN_DIR OUT")
                         + f" (or --out OUT); got {len(paths)} path(s): {' '.join(paths) or 'none'}")
    if args.config:
        cfg = load_config(args.config, overrides)
        source = cfg.run.dir
    else:
        source = paths[0]
        cfg = None
        if overrides:
            if not (Path(source) / CONFIG_NAME).is_file():
                raise UsageError(f"{' '.join(overrides)}: {source!r} has no {CONFIG_NAME} to override; give a run "
                                 "folder, or --config FILE")
            cfg = load_run_config(source, overrides)
    ckpt, said = export(source, paths[-1], args.dtype, args.force, checkpoint=args.checkpoint, cfg=cfg)
    print(f"exported {describe(ckpt)} to {paths[-1]}; {said}")
    return 0
