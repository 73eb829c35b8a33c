"""The named DeviceMesh for a layout (the sizes and the checks that a layout fits the model and
schedule are plain arithmetic in core/layout.py)."""
from __future__ import annotations

import gc

import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

try:        # DTensor's sharding-propagation caches' clear (private; checked on torch 2.13), see release_mesh
    from torch.distributed.tensor.debug import _clear_sharding_prop_cache
except ImportError:
    _clear_sharding_prop_cache = None

from core.errors import ConfigError
from core.layout import EP_MESH_DIMS, MESH_DIMS
from core.parallel_config import ParallelConfig
from parallel.dims import ParallelDims


def build_mesh(cfg: ParallelConfig, ctx) -> ParallelDims:
    """Resolve the sizes against the world and, for world > 1, build one DeviceMesh named
    (pp, dp_replicate, dp_shard, tp) with a flattened "dp" (replicate x shard) sub-mesh; with
    expert parallel (pp, dp_replicate, edp_shard, ep, tp), dp_shard being (edp_shard, ep) flattened;
    with context parallel (pp, dp_replicate, dp_shard, cp, tp) and "dp_cp", "dp_shard_cp" flattenings."""
    dims = ParallelDims.resolve(cfg, ctx.world_size)
    if ctx.world_size == 1:
        return dims
    if not ctx.distributed:
        raise ConfigError(f"parallel: world size {ctx.world_size} without a process group; launch with torchrun")
    sizes = {name: getattr(dims, name) for name in MESH_DIMS}
    names = MESH_DIMS
    if dims.ep_enabled:   # dp_shard as (dp_shard / ep, ep): experts over "ep", dense FSDP over both
        names = EP_MESH_DIMS
        sizes.update(edp_shard=dims.dp_shard // dims.ep, ep=dims.ep)
    mesh = init_device_mesh(ctx.device.type, tuple(sizes[n] for n in names), mesh_dim_names=names)
    # Private but stable since torch 2.6 and what torchtitan uses; the public replacement is not in 2.11.
    # Kept on dims: slicing a flattened dim from the root mesh is deprecated.
    if dims.ep_enabled:
        dims.dp_shard_mesh = mesh["edp_shard", "ep"]._flatten("dp_shard")
        dims.dp_flat_mesh = mesh["dp_replicate", "edp_shard", "ep"]._flatten("dp")
    else:
        dims.dp_flat_mesh = mesh["dp_replicate", "dp_shard"]._flatten("dp")
    dims.dp_cp_flat_mesh = dims.dp_flat_mesh
    if dims.cp > 1:   # new groups only where context parallel needs them (each costs a rendezvous)
        dims.dp_cp_flat_mesh = mesh["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
        dims.shard_cp_flat_mesh = mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
    dims.mesh = mesh
    dims.dp_rank = dims.dp_flat_mesh.get_local_rank()
    dims.pp_rank = mesh["pp"].get_local_rank()
    dims.tp_rank = mesh["tp"].get_local_rank()
    dims.cp_rank = mesh["cp"].get_local_rank() if dims.cp > 1 else 0   # no cp dim under ep (exclusive)
    return dims


def release_mesh(dims: ParallelDims) -> None:
    """Destroy the process groups `build_mesh` made (never the default group) once the training
    that used them is over. One training per process leaves them to its exit, but a process that
    trains several times (`meshformer plan calibrate`, the parity tests' launches) otherwise keeps
    every old mesh's groups, each with a gloo device whose loop thread wakes on its own: 4 ranks on
    2 cores held 43 such threads per rank after 9 short runs, using 5% of a core each while idle,
    and a layout's tokens/s fell run after run (fsdp4 6.9k -> 3.8k over 30 runs on an idle machine).
    Destroying a group only unregisters it; its threads end with the last reference, so the meshes'
    own registries of group objects are emptied too (torch's caches keep old meshes alive, keyed by
    value) and the cycles holding the model are collected. DTensor's sharding-propagation cache
    also keys on a mesh's value, not its identity: a later equal mesh would be handed specs whose
    groups are gone ("Could not resolve the process group"), so it is cleared. A torch without
    that (private) clear keeps the groups."""
    if dims.mesh is None or _clear_sharding_prop_cache is None:
        return
    meshes = [m for m in (dims.mesh, dims.dp_flat_mesh, dims.dp_cp_flat_mesh, dims.shard_cp_flat_mesh,
                          dims.dp_shard_mesh) if m is not None]
    groups = {g.group_name: g for m in meshes for g in m.get_all_groups()}
    for group in groups.values():
        if group != dist.group.WORLD:     # a mesh dim over every rank is the default group itself
            dist.destroy_process_group(group)
    for m in meshes:
        getattr(m, "_pg_registry", {}).clear()     # torch.compile's lookup table: the groups' last holder
    _clear_sharding_prop_cache()
    dims.mesh = dims.dp_flat_mesh = dims.dp_cp_flat_mesh = dims.shard_cp_flat_mesh = dims.dp_shard_mesh = None
    gc.collect()
