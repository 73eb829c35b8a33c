"""`accelerate launch` for real (multi-process on CPU) must give torchrun's loss, on one machine and
as two "machines" on loopback; an accelerate config (its YAML, or what `accelerate launch` exports)
fills the run-config keys the user left unset and names what does not map.

The real runs share one 2-process torchrun reference (dp_shard 2, a few steps), the layout of the
issue's acceptance command; the mapping itself is checked on dicts, with no process started.
"""
from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from core.accelerate_config import from_launch_env, map_settings, under_run_config
from core.errors import ConfigError
from core.launch_config import LaunchConfig
from launch.discovery import LaunchError, discover
from tests.launch.conftest import assert_same_loss, child_env, free_port, run_logged, tail
from tests.launch.runs import write_config

STEPS = 4
LAYOUT = ["--parallel.dp_shard", "2"]

FSDP_YAML = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
mixed_precision: bf16
num_machines: 2
num_processes: 8
machine_rank: 0
main_process_ip: 10.0.0.1
fsdp_config:
  fsdp_version: 2
  fsdp_reshard_after_forward: false
  fsdp_offload_params: true
  fsdp_activation_checkpointing: true
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_cpu_ram_efficient_loading: false
dynamo_config:
  dynamo_backend: INDUCTOR
"""


def test_yaml_maps_what_has_a_counterpart_and_names_the_rest(tmp_path):
    path = tmp_path / "fsdp.yaml"
    path.write_text(FSDP_YAML)
    tables, line = under_run_config({"precision": {"dtype": "fp32"}}, str(path), {})
    assert tables["parallel"] == {"fsdp_reshard_after_forward": False, "fsdp_cpu_offload": True, "ac": "full"}
    assert tables["precision"] == {"dtype": "fp32"}                  # the user's key wins over mixed_precision
    assert tables["launch"] == {"accelerate_config": str(path)}
    assert "\n" not in line and "your config wins for precision.dtype" in line
    # named: keys asking for something we do not do; silent: launcher keys and false flags
    assert line.endswith("not mapped: fsdp_auto_wrap_policy, dynamo_backend=INDUCTOR "
                         "(parallel.compile = true compiles each block)")
    for quiet in ("num_processes", "machine_rank", "main_process_ip", "fsdp_cpu_ram_efficient_loading", "fsdp_version"):
        assert quiet not in line


@pytest.mark.parametrize("strategy, expect", [
    ("FULL_SHARD", {"fsdp_reshard_after_forward": True}),
    ("SHARD_GRAD_OP", {"fsdp_reshard_after_forward": False}),
    ("HYBRID_SHARD", {"dp_replicate": 2, "fsdp_reshard_after_forward": True}),
    ("NO_SHARD", {"dp_shard": 1, "dp_replicate": 8}),
    ("3", {"dp_shard": 1, "dp_replicate": 8}),          # FSDP_SHARDING_STRATEGY may carry the enum's number
])
def test_fsdp1_sharding_strategies(strategy, expect):
    layer = map_settings({"num_processes": 8, "num_machines": 2, "distributed_type": "FSDP",
                          "fsdp_config": {"fsdp_sharding_strategy": strategy}}, "x")
    assert layer.tables["parallel"] == expect and not layer.unmapped


def test_deepspeed_maps_to_our_engine_and_fp16_is_named_not_mapped():
    layer = map_settings({"distributed_type": "DEEPSPEED", "mixed_precision": "fp16",
                          "deepspeed_config": {"deepspeed_config_file": "ds.json", "zero_stage": 3,
                                               "offload_optimizer_device": "cpu", "offload_param_device": "none",
                                               "zero3_init_flag": False, "zero3_save_16bit_model": True}}, "x")
    assert layer.tables == {"parallel": {"engine": "deepspeed", "deepspeed_config": "ds.json", "zero_stage": 3,
                                         "offload_optimizer": "cpu"}}
    assert layer.unmapped == ["mixed_precision=fp16 (use bf16)", "zero3_save_16bit_model"]


def test_launch_variables_are_read_like_the_yaml():
    """What accelerate 1.15's launcher exports (utils/launch.py prepare_multi_gpu_env) for
    `--use_fsdp --fsdp_sharding_strategy SHARD_GRAD_OP --mixed_precision bf16` and a 2-D
    parallelism_config; its default-valued FSDP flags stay quiet."""
    env = {"RANK": "0", "WORLD_SIZE": "4", "GROUP_WORLD_SIZE": "1", "ACCELERATE_MIXED_PRECISION": "bf16",
           "ACCELERATE_DYNAMO_BACKEND": "NO", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1",
           "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP", "FSDP_OFFLOAD_PARAMS": "false", "FSDP_USE_ORIG_PARAMS": "true",
           "FSDP_ACTIVATION_CHECKPOINTING": "false", "FSDP_FORWARD_PREFETCH": "false",
           "ACCELERATE_USE_PARALLELISM_CONFIG": "true", "PARALLELISM_CONFIG_DP_REPLICATE_SIZE": "1",
           "PARALLELISM_CONFIG_DP_SHARD_SIZE": "2", "PARALLELISM_CONFIG_TP_SIZE": "2", "PARALLELISM_CONFIG_CP_SIZE": "1"}
    tables, line = under_run_config({}, "", env)
    assert tables["precision"] == {"dtype": "bf16"}
    assert tables["parallel"] == {"fsdp_reshard_after_forward": False, "fsdp_cpu_offload": False,
                                  "dp_replicate": 1, "dp_shard": 2, "tp": 2, "cp": 1}
    assert line.startswith("accelerate config (accelerate launch): ")
    assert line.endswith("not mapped: fsdp_use_orig_params")      # "true" asks for something; "false" does not
    assert from_launch_env({"RANK": "0"}) is None and under_run_config({}, "", {"RANK": "0"}) == ({}, "")


def test_bad_yaml_is_one_config_error(tmp_path):
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"launch.accelerate_config: .*list.yaml.* should hold a mapping"):
        under_run_config({"launch": {"accelerate_config": str(tmp_path / "list.yaml")}}, "", {})


def test_simple_launcher_single_process_is_named():
    """Without GPUs and without --multi_gpu, accelerate starts one process with MASTER_ADDR set
    and no RANK; the layout would then fail with a world of 1, so discovery says what to add."""
    env = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_CPU": "False", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29500"}
    with pytest.raises(LaunchError, match=r"only with --multi_gpu"):
        discover(LaunchConfig(), env)
    assert discover(LaunchConfig(launcher="none"), env).world_size == 1


# ---- real launches -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("accelerate")
    write_config(root, steps=STEPS, every=0)
    return root


def trainer_args(work: Path, name: str) -> list[str]:
    return ["-m", "trainer", "--config", str(work / "run.toml"), "--run.dir", str(work / name), *LAYOUT]


def accelerate_env(work: Path, default_config: str = "") -> dict:
    """HF_HOME decides where accelerate looks for its default config: a fresh folder per use,
    never the user's ~/.cache/huggingface."""
    home = work / ("hf-with-config" if default_config else "hf-empty")
    (home / "accelerate").mkdir(parents=True, exist_ok=True)
    if default_config:
        (home / "accelerate" / "default_config.yaml").write_text(default_config)
    return child_env(HF_HOME=str(home))


@pytest.fixture(scope="module")
def reference(work) -> Path:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *trainer_args(work, "torchrun")]
    assert run_logged(cmd, work / "torchrun.log") == 0, tail(work / "torchrun.log")
    return work / "torchrun"


@pytest.mark.slow
def test_accelerate_launch_matches_torchrun(reference, work):
    """The issue's command as typed. Without GPUs accelerate starts several processes only for
    --multi_gpu or `distributed_type: MULTI_GPU`, so the latter sits in its default config (with a
    dynamo backend, which we name as not mapped). Same arithmetic as torchrun: bit-equal."""
    pytest.importorskip("accelerate")
    default = ("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nmixed_precision: 'no'\n"
               "num_machines: 1\nnum_processes: 2\ngpu_ids: all\ndynamo_config:\n  dynamo_backend: INDUCTOR\n")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", *trainer_args(work, "accelerate")]
    log = work / "accelerate.log"
    assert run_logged(cmd, log, env=accelerate_env(work, default)) == 0, tail(log)
    text = log.read_text()
    assert "world 2 on cpu (launched by accelerate)" in text
    notes = [line for line in text.splitlines() if line.startswith("accelerate config (accelerate launch)")]
    assert len(notes) == 1, text                                   # rank 0 only
    assert "mixed_precision=no -> precision.dtype=fp32" in notes[0] and "not mapped: dynamo_backend=INDUCTOR" in notes[0]
    assert_same_loss(work / "accelerate", reference, rel=0.0)


@pytest.mark.slow
def test_two_accelerate_machines_on_loopback_match(reference, work):
    pytest.importorskip("accelerate")
    port = free_port()
    cmds = [[sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
             "--num_processes", "2", "--machine_rank", str(node), "--main_process_ip", "127.0.0.1",
             "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
             *trainer_args(work, "accelerate-two")] for node in (0, 1)]
    logs = [work / f"accelerate-node{node}.log" for node in (0, 1)]
    env = accelerate_env(work)
    with ThreadPoolExecutor(2) as pool:
        rcs = list(pool.map(lambda c, log: run_logged(c, log, env=env), cmds, logs))
    assert rcs == [0, 0], "\n".join(tail(log) for log in logs)
    assert "world 2 on cpu (launched by accelerate)" in logs[0].read_text()
    assert_same_loss(work / "accelerate-two", reference, rel=0.0)
