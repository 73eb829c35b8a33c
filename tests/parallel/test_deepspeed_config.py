"""The ds_config of a run (parallel/deepspeed_config.py): generated from our keys, a user's
ds_config.json merged over it with each difference named, and the keys our loader and loss
normalisation depend on refused when they differ. Pure dicts: no DeepSpeed, no processes."""
from __future__ import annotations

import json

import pytest

from core.errors import ConfigError
from core.parallel_config import ParallelConfig
from parallel.deepspeed_config import build_ds_config


def pcfg(tmp_path=None, user: dict | None = None, **kw) -> ParallelConfig:
    if user is not None:
        path = tmp_path / "ds_config.json"
        path.write_text(json.dumps(user))
        kw["deepspeed_config"] = str(path)
    return ParallelConfig(engine="deepspeed", **kw)


def test_generated_from_our_keys():
    cfg, diffs = build_ds_config(pcfg(zero_stage=3, offload_optimizer="cpu", offload_param="nvme", nvme_path="/nvme"),
                                 micro_batch=4, grad_accum=2, dp_size=8, dtype="bf16", grad_clip=1.0)
    assert diffs == []
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) == (4, 2, 64)
    assert cfg["bf16"] == {"enabled": True} and cfg["gradient_clipping"] == 1.0
    assert cfg["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                        "offload_param": {"device": "nvme", "nvme_path": "/nvme"}}


def test_user_file_wins_and_differences_are_named(tmp_path):
    user = {"zero_optimization": {"stage": 3, "overlap_comm": True}, "gradient_clipping": 0.5,
            "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 2}
    cfg, diffs = build_ds_config(pcfg(tmp_path, user, zero_stage=2), micro_batch=4, grad_accum=2, dp_size=2,
                                 dtype="fp32", grad_clip=1.0)
    assert cfg["zero_optimization"] == {"stage": 3, "overlap_comm": True}     # theirs over ours, nested
    assert cfg["gradient_clipping"] == 0.5 and cfg["train_micro_batch_size_per_gpu"] == 4   # "auto" takes ours
    assert sorted(diffs) == ["gradient_clipping: 1.0 -> 0.5", "zero_optimization.stage: 2 -> 3"]


@pytest.mark.parametrize("user, match", [
    ({"train_micro_batch_size_per_gpu": 16}, r"train_micro_batch_size_per_gpu = 16 but this run has 4; set train.batch_size"),
    ({"gradient_accumulation_steps": 8}, r"gradient_accumulation_steps = 8 .*set train.grad_accum"),
    ({"bf16": {"enabled": True}}, r"bf16.enabled = True .*set precision.dtype"),
    ({"optimizer": {"type": "Adam"}}, r"'optimizer' section; meshformer builds the optimizer"),
])
def test_conflicts_our_trainer_depends_on_are_refused(tmp_path, user, match):
    with pytest.raises(ConfigError, match=match):
        build_ds_config(pcfg(tmp_path, user), micro_batch=4, grad_accum=1, dp_size=2, dtype="fp32", grad_clip=1.0)


def test_bad_json_is_named(tmp_path):
    (tmp_path / "ds.json").write_text("{ not json")
    with pytest.raises(ConfigError, match=r"parallel.deepspeed_config: .*ds.json is not valid JSON"):
        build_ds_config(pcfg(deepspeed_config=str(tmp_path / "ds.json")), 1, 1, 2, "fp32", 0.0)
