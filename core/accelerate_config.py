"""What an Hugging Face accelerate config means here: its YAML (`accelerate config` writes one) or
the variables `accelerate launch` hands its processes, turned into `--section.key` tables that lie
*beneath* the run config, so a key the user's TOML or command line sets always wins.

`accelerate launch` does not tell its processes which YAML it read; it exports what it took from it
(ACCELERATE_MIXED_PRECISION, FSDP_*, PARALLELISM_CONFIG_*, ACCELERATE_DEEPSPEED_CONFIG_FILE, ...).
Both sources are first brought to the YAML's shape, then one mapping reads them. Keys that only
steer the launcher (num_processes, machine_rank, main_process_ip, ...) are taken by it and need
nothing here; every other key without a counterpart is named, never dropped silently.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import yaml      # PyYAML: a dependency of webdataset (and of accelerate)

from core.errors import ConfigError

# Read by `accelerate launch` itself (processes, machines, rendezvous, devices): the trainer finds
# their effect in RANK/WORLD_SIZE/MASTER_ADDR (launch/discovery.py).
LAUNCHER_KEYS = frozenset({
    "compute_environment", "num_processes", "num_machines", "machine_rank", "main_process_ip",
    "main_process_port", "rdzv_backend", "same_network", "gpu_ids", "use_cpu", "main_training_function",
    "debug", "enable_cpu_affinity", "num_cpu_threads_per_process", "mpirun_config", "tpu_env",
    "tpu_use_cluster", "tpu_use_sudo", "downcast_bf16", "commands", "command_file",
})
# distributed_type values that say only how many processes to start
PLAIN_TYPES = ("NO", "MULTI_GPU", "MULTI_CPU", "MULTI_NPU", "MULTI_XPU", "MULTI_MLU", "MULTI_MUSA", "MULTI_HPU")
DTYPES = {"no": "fp32", "bf16": "bf16", "fp8": "fp8"}
SHARDING = {"FULL_SHARD": 1, "SHARD_GRAD_OP": 2, "NO_SHARD": 3, "HYBRID_SHARD": 4, "HYBRID_SHARD_ZERO2": 5}
PARALLELISM = {"dp_replicate_size": "dp_replicate", "dp_shard_size": "dp_shard", "tp_size": "tp", "cp_size": "cp"}
TRUE = ("true", "1", "yes")
# values of an unmapped key that ask for nothing (accelerate exports its defaults too)
NOTHING = ("", "none", "false", "0", "no")


@dataclass
class AccelerateLayer:
    source: str                                          # the YAML's path, or "accelerate launch"
    tables: dict[str, dict] = field(default_factory=dict)
    mapped: list[str] = field(default_factory=list)      # "mixed_precision=bf16 -> precision.dtype=bf16"
    unmapped: list[str] = field(default_factory=list)    # accelerate keys with no counterpart here

    def set(self, what: str, section: str, key: str, value) -> None:
        self.tables.setdefault(section, {})[key] = value
        self.mapped.append(f"{what} -> {section}.{key}={value}")

    def beneath(self, tables: dict[str, dict]) -> tuple[dict[str, dict], list[str]]:
        """`tables` over this layer, and the mapped keys `tables` already set (the user's win)."""
        merged = {s: dict(v) for s, v in self.tables.items()}
        kept = [f"{s}.{k}" for s, keys in tables.items() for k in keys if k in self.tables.get(s, {})]
        for section, keys in tables.items():
            merged.setdefault(section, {}).update(keys)
        return merged, kept

    def line(self, kept: list[str]) -> str:
        """The one startup line: what was taken, what the run config overrode, what has no counterpart."""
        parts = [f"accelerate config ({self.source}): " + ("; ".join(self.mapped) or "nothing to map")]
        if kept:
            parts.append("your config wins for " + ", ".join(kept))
        if self.unmapped:
            parts.append("not mapped: " + ", ".join(self.unmapped))
        return " | ".join(parts)


def _bool(value) -> bool:
    return value is True or str(value).strip().lower() in TRUE


def _asks_nothing(value) -> bool:
    return value is None or value is False or str(value).strip().lower() in NOTHING


def read_yaml(path: str | Path) -> dict:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"launch.accelerate_config: {str(p)!r} not found (`accelerate config` writes "
                          "~/.cache/huggingface/accelerate/default_config.yaml)")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"launch.accelerate_config: {str(p)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"launch.accelerate_config: {str(p)!r} should hold a mapping of accelerate settings "
                          f"(compute_environment, distributed_type, mixed_precision, ...), got {type(data).__name__}")
    return data


def from_launch_env(env: Mapping[str, str]) -> dict | None:
    """What `accelerate launch` exported to this process, in the YAML's shape; None when it did not
    start us (it always exports ACCELERATE_MIXED_PRECISION)."""
    if "ACCELERATE_MIXED_PRECISION" not in env:
        return None
    out: dict = {"mixed_precision": env["ACCELERATE_MIXED_PRECISION"],
                 "num_processes": env.get("WORLD_SIZE", "1"), "num_machines": env.get("GROUP_WORLD_SIZE", "1")}
    if _bool(env.get("ACCELERATE_USE_FSDP", "")):
        out["distributed_type"] = "FSDP"
        out["fsdp_config"] = {"fsdp_" + k[5:].lower(): v for k, v in env.items() if k.startswith("FSDP_")}
    if _bool(env.get("ACCELERATE_USE_DEEPSPEED", "")):
        out["distributed_type"] = "DEEPSPEED"
        out["deepspeed_config"] = {"deepspeed_config_file": env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")}
    if _bool(env.get("ACCELERATE_USE_MEGATRON_LM", "")):
        out["distributed_type"] = "MEGATRON_LM"
    if _bool(env.get("ACCELERATE_USE_PARALLELISM_CONFIG", "")):
        out["parallelism_config"] = {"parallelism_config_" + k[19:].lower(): v for k, v in env.items()
                                     if k.startswith("PARALLELISM_CONFIG_")}
    if env.get("ACCELERATE_DYNAMO_BACKEND", "NO").upper() != "NO":
        out["dynamo_config"] = {"dynamo_backend": env["ACCELERATE_DYNAMO_BACKEND"]}
    return out


def _fsdp(layer: AccelerateLayer, fsdp: dict, processes: int, machines: int) -> None:
    for key, value in fsdp.items():
        name = key if key.startswith("fsdp_") else "fsdp_" + key
        if name == "fsdp_sharding_strategy" or (name == "fsdp_reshard_after_forward" and str(value).upper() in SHARDING):
            # FSDP1 names (or their numbers, as FSDP_SHARDING_STRATEGY carries them)
            strategy = str(value).upper()
            strategy = {str(n): s for s, n in SHARDING.items()}.get(strategy, strategy)
            if strategy in ("FULL_SHARD", "SHARD_GRAD_OP"):
                layer.set(f"{name}={value}", "parallel", "fsdp_reshard_after_forward", strategy == "FULL_SHARD")
            elif strategy in ("HYBRID_SHARD", "HYBRID_SHARD_ZERO2"):
                layer.set(f"{name}={value}", "parallel", "dp_replicate", machines)
                layer.set(f"{name}={value}", "parallel", "fsdp_reshard_after_forward", strategy == "HYBRID_SHARD")
            elif strategy == "NO_SHARD":
                layer.set(f"{name}={value}", "parallel", "dp_shard", 1)
                layer.set(f"{name}={value}", "parallel", "dp_replicate", processes)
            else:
                layer.unmapped.append(f"{name}={value}")
        elif name == "fsdp_reshard_after_forward":           # FSDP2: a plain bool
            layer.set(f"{name}={value}", "parallel", "fsdp_reshard_after_forward", _bool(value))
        elif name == "fsdp_offload_params":
            layer.set(f"{name}={value}", "parallel", "fsdp_cpu_offload", _bool(value))
        elif name == "fsdp_activation_checkpointing":
            if _bool(value):
                layer.set(f"{name}={value}", "parallel", "ac", "full")
        elif name == "fsdp_version":
            pass                                             # parallelize always shards with FSDP2 (fully_shard)
        elif not _asks_nothing(value):                       # wrap policy, state-dict type, prefetch...:
            layer.unmapped.append(name)                      # parallelize decides these itself


# accelerate's deepspeed_config keys -> parallel.* (parallel.engine = "deepspeed"); the rest (its
# gradient accumulation and clipping, zero3 init/save flags) are ours to set in [train]/[optim]
DEEPSPEED_KEYS = {"deepspeed_config_file": "deepspeed_config", "zero_stage": "zero_stage",
                  "offload_optimizer_device": "offload_optimizer", "offload_param_device": "offload_param"}


def map_settings(settings: dict, source: str) -> AccelerateLayer:
    layer = AccelerateLayer(source)
    processes, machines = int(settings.get("num_processes") or 1), int(settings.get("num_machines") or 1)
    for key, value in settings.items():
        if key in LAUNCHER_KEYS or value is None or value == {}:
            continue
        if key == "mixed_precision":
            if str(value).lower() in DTYPES:
                layer.set(f"mixed_precision={value}", "precision", "dtype", DTYPES[str(value).lower()])
            else:
                layer.unmapped.append(f"mixed_precision={value} (use bf16)")
        elif key == "distributed_type":
            if value == "DEEPSPEED":
                layer.set("distributed_type=DEEPSPEED", "parallel", "engine", "deepspeed")
            elif value not in PLAIN_TYPES + ("FSDP",):
                layer.unmapped.append(f"distributed_type={value}")
        elif key == "fsdp_config":
            _fsdp(layer, value, processes, machines)
        elif key == "parallelism_config":
            for name, size in value.items():
                ours = PARALLELISM.get(name.removeprefix("parallelism_config_"))
                if ours:                                     # the sizes multiply to the world, as ours do
                    layer.set(f"{name}={size}", "parallel", ours, int(size))
                elif not (_asks_nothing(size) or str(size) == "1"):
                    layer.unmapped.append(f"{name}={size}")
        elif key == "deepspeed_config":
            for name, v in value.items():
                ours = DEEPSPEED_KEYS.get(name)
                if ours and not _asks_nothing(v):
                    layer.set(f"{name}={v}", "parallel", ours, int(v) if ours == "zero_stage" else str(v))
                elif not _asks_nothing(v):
                    layer.unmapped.append(name)
        elif key == "dynamo_config":
            if str(value.get("dynamo_backend", "NO")).upper() != "NO":
                layer.unmapped.append(f"dynamo_backend={value['dynamo_backend']} (parallel.compile = true compiles each block)")
        else:
            layer.unmapped.append(key)
    return layer


def accelerate_layer(yaml_path: str, env: Mapping[str, str]) -> AccelerateLayer | None:
    """The layer from an explicit YAML (--accelerate-config / launch.accelerate_config), else from
    what `accelerate launch` exported; None when there is neither."""
    if yaml_path:
        return map_settings(read_yaml(yaml_path), yaml_path)
    settings = from_launch_env(env)
    return None if settings is None else map_settings(settings, "accelerate launch")


def under_run_config(tables: dict[str, dict], yaml_path: str, env: Mapping[str, str]) -> tuple[dict[str, dict], str]:
    """The user's tables (TOML + overrides) laid over the accelerate layer, and the one line to
    print at startup ("" when no accelerate config is in play)."""
    path = yaml_path or str(tables.get("launch", {}).get("accelerate_config", "") or "")
    layer = accelerate_layer(path, env)
    if layer is None:
        return tables, ""
    merged, kept = layer.beneath(tables)
    if yaml_path:              # recorded in the run's config.toml like any other key
        merged.setdefault("launch", {})["accelerate_config"] = yaml_path
    return merged, layer.line(kept)
