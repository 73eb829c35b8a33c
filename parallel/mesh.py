"""The named DeviceMesh for a layout (the sizes and the checks that a layout fits the model and
schedule are plain arithmetic in core/layout.py)."""
from __future__ import annotations

from torch.distributed.device_mesh import init_device_mesh

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
