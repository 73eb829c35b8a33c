"""`meshformer doctor`: check what a job will need before it is queued, in plain words.

One line per check, `ok`, `warning` or `problem`; exit status 1 when there is a problem. Run it
like the job (same config, same launcher: `srun ... python -m trainer doctor --config F`, or under
torchrun) and it also checks that every process reaches the rendezvous and that every node sees
the same run folder (each rank writes a file there, every rank looks for all of them): a run
folder that is local to each node loses the checkpoint shards other nodes wrote.

The checks are functions of what they look at (environment, interfaces, HCAs, paths) so tests
can feed them a cluster this machine is not.
"""
from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
import torch.distributed as dist

from launch.context import init_distributed, shutdown

GIB = 1024 ** 3
BYTES_PER_PARAM = 12       # a checkpoint holds fp32 weights (4 B) and AdamW's two moments (8 B) per parameter
IB_SYSFS = Path("/sys/class/infiniband")
ROCE_ONLY = ("NCCL_IB_GID_INDEX", "NCCL_IB_ROCE_VERSION_NUM")


@dataclass(frozen=True)
class Check:
    level: str               # ok | warning | problem
    text: str


def check_torch() -> list[Check]:
    build = (f"CUDA {torch.version.cuda} build" if torch.version.cuda else
             f"ROCm {torch.version.hip} build" if getattr(torch.version, "hip", None) else "CPU-only build")
    out = [Check("ok", f"torch {torch.__version__} ({build})")]
    if not dist.is_available():
        out.append(Check("problem", "this torch has no torch.distributed: multi-process training cannot start"))
    elif (torch.version.cuda or getattr(torch.version, "hip", None)) and not dist.is_nccl_available():
        out.append(Check("warning", "this torch was built without NCCL: GPU jobs would fall back to gloo (slow)"))
    return out


def check_devices(device_request: str, env: Mapping[str, str]) -> list[Check]:
    gpu_build = bool(torch.version.cuda or getattr(torch.version, "hip", None))
    visible = env.get("CUDA_VISIBLE_DEVICES", env.get("HIP_VISIBLE_DEVICES"))
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        names = sorted({torch.cuda.get_device_name(i) for i in range(n)})
        return [Check("ok", f"{n} GPU(s) visible: {', '.join(names)}"
                      + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""))]
    if device_request == "cuda":
        return [Check("problem", "train.device is 'cuda' but torch sees no GPU here"
                      + ("" if gpu_build else " (this torch is the CPU-only build)"))]
    if gpu_build:
        why = f"CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "no driver or no device"
        return [Check("warning", f"this torch is built for GPUs but sees none ({why}): training would run on CPU")]
    if Path("/dev/nvidia0").exists() or Path("/dev/kfd").exists():
        return [Check("warning", "this machine has GPUs but torch is the CPU-only build: install a CUDA/ROCm torch")]
    return [Check("ok", "no GPU: training runs on CPU with gloo")]


def _matches(spec: str, names: list[str]) -> bool:
    """NCCL's list syntax (NCCL_SOCKET_IFNAME, NCCL_IB_HCA): comma-separated prefixes, `=` for exact
    names, a leading `^` to exclude; `:port` suffixes on HCAs."""
    exclude, exact = spec.startswith("^"), spec.lstrip("^").startswith("=")
    items = [x.split(":")[0] for x in spec.lstrip("^=").split(",") if x]
    hit = [n for n in names if any(n == x if exact else n.startswith(x) for x in items)]
    return bool([n for n in names if n not in hit]) if exclude else bool(hit)


def check_nccl_env(env: Mapping[str, str], interfaces: list[str], hcas: dict[str, str], gpus: int,
                   nodes: int) -> list[Check]:
    """`hcas`: InfiniBand device -> link layer ("InfiniBand" or "Ethernet" for RoCE)."""
    out = []
    ifname = env.get("NCCL_SOCKET_IFNAME", "")
    if ifname and not _matches(ifname, interfaces):
        out.append(Check("problem", f"NCCL_SOCKET_IFNAME={ifname} matches none of this node's network interfaces "
                                    f"({', '.join(interfaces)}): NCCL cannot open its sockets"))
    elif not ifname and gpus and nodes > 1:
        out.append(Check("warning", "NCCL_SOCKET_IFNAME is not set: NCCL takes the first interface that is not "
                                    "loopback or docker; set it to the cluster network if the job hangs at start"))
    hca = env.get("NCCL_IB_HCA", "")
    if hca and not hcas:
        out.append(Check("warning", f"NCCL_IB_HCA={hca} is set but this node has no InfiniBand/RoCE devices"))
    elif hca and not _matches(hca, list(hcas)):
        out.append(Check("problem", f"NCCL_IB_HCA={hca} matches none of this node's HCAs ({', '.join(sorted(hcas))})"))
    links = set(hcas.values())
    if links == {"InfiniBand"}:
        for name in ROCE_ONLY:
            if env.get(name):
                out.append(Check("warning", f"{name}={env[name]} is a RoCE (Ethernet) setting but this node's HCAs "
                                            "are InfiniBand; remove it"))
    if "Ethernet" in links and not env.get("NCCL_IB_GID_INDEX"):
        out.append(Check("warning", "RoCE HCAs and no NCCL_IB_GID_INDEX: NCCL may pick a GID that does not route "
                                    "(RoCE v2 is usually index 3; `show_gids` lists them)"))
    if hcas and env.get("NCCL_IB_DISABLE") == "1":
        out.append(Check("warning", "NCCL_IB_DISABLE=1 on a node with HCAs: NCCL uses TCP sockets, far slower"))
    for name in ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_ASYNC_ERROR_HANDLING"):
        if env.get(name) == "0":
            out.append(Check("warning", f"{name}=0: a failed or timed-out collective hangs instead of ending the job"))
    for name in ("NCCL_P2P_DISABLE", "NCCL_SHM_DISABLE"):
        if env.get(name) == "1":
            out.append(Check("warning", f"{name}=1: GPUs of one node talk through the network stack, slower"))
    if not out:
        set_ = sorted(k for k in env if k.startswith(("NCCL_", "TORCH_NCCL_")))
        out.append(Check("ok", "NCCL/IB variables: " + (", ".join(f"{k}={env[k]}" for k in set_) if set_ else
                                                        "none set" + ("" if gpus else " (not needed without GPUs)"))))
    return out


def check_run_dir(run_dir: Path, need_bytes: int) -> list[Check]:
    if run_dir.exists() and not run_dir.is_dir():
        return [Check("problem", f"run.dir {run_dir} is a file, not a folder")]
    base = next(p for p in [run_dir, *run_dir.absolute().parents] if p.exists())
    try:
        with tempfile.NamedTemporaryFile(dir=base, prefix=".doctor-"):
            pass
    except OSError as e:
        return [Check("problem", f"run.dir {run_dir}: cannot write in {base} ({e.strerror or e})")]
    free = shutil.disk_usage(base).free
    size = (f"{free / GIB:.1f} GiB free for run.dir {run_dir}; its checkpoints need about {need_bytes / GIB:.2f} GiB "
            f"(checkpoint.keep + 1 saves of weights and optimizer)")
    level = "problem" if free < need_bytes else "warning" if free < 2 * need_bytes else "ok"
    return [Check(level, size + {"problem": ": not enough", "warning": ": little room for logs and growth"}.get(level, ""))]


def check_shared_run_dir(ctx, run_dir: Path) -> list[Check]:
    """Every rank writes a token file into run.dir, then every rank looks for all of them."""
    token = [uuid.uuid4().hex if ctx.rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    probe = run_dir / f".doctor-{token[0]}"
    where = f"rank-{ctx.rank}@{socket.gethostname()}"
    try:
        probe.mkdir(parents=True, exist_ok=True)
        (probe / where).write_text("")
        wrote = True
    except OSError:
        wrote = False
    names = [None] * ctx.world_size
    dist.all_gather_object(names, where if wrote else "")
    dist.barrier()
    unseen = [n for n in names if n and not (probe / n).exists()]
    seen_by = [None] * ctx.world_size
    dist.all_gather_object(seen_by, unseen)
    dist.barrier()
    if wrote:
        (probe / where).unlink(missing_ok=True)
    dist.barrier()
    if ctx.rank == 0:
        shutil.rmtree(probe, ignore_errors=True)
    blind = {names[r]: miss for r, miss in enumerate(seen_by) if miss}
    if blind:
        first, miss = next(iter(blind.items()))
        return [Check("problem", f"run.dir {run_dir} is not one shared folder: {len(blind)} of {ctx.world_size} ranks "
                                 f"do not see files other ranks wrote there ({first} misses {', '.join(miss[:4])}"
                                 f"{' ...' if len(miss) > 4 else ''}); put run.dir on a filesystem every node mounts")]
    if names.count(""):
        return [Check("problem", f"{names.count('')} rank(s) could not write into run.dir {run_dir}")]
    hosts = sorted({n.split("@", 1)[1] for n in names})
    return [Check("ok", f"all {ctx.world_size} ranks on {len(hosts)} node(s) reached the rendezvous and see one run.dir")]


def ib_devices() -> dict[str, str]:
    found = {}
    for dev in sorted(IB_SYSFS.glob("*")) if IB_SYSFS.is_dir() else []:
        layers = {p.read_text().strip() for p in dev.glob("ports/*/link_layer")}
        found[dev.name] = "Ethernet" if "Ethernet" in layers else "InfiniBand"
    return found


def run_checks(cfg, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    ctx = init_distributed(cfg.launch, "cpu")     # gloo is enough to meet: the checks move no tensors
    try:
        nodes = int(env.get("SLURM_NNODES") or env.get("GROUP_WORLD_SIZE") or 1)
        run_dir = Path(cfg.run.dir)
        need = BYTES_PER_PARAM * cfg.model.num_params() * (cfg.checkpoint.keep + 1)
        checks = [*check_torch(), *check_devices(cfg.train.device, env),
                  *check_nccl_env(env, [n for _, n in socket.if_nameindex()], ib_devices(),
                                  torch.cuda.device_count(), nodes),
                  *check_run_dir(run_dir, need)]
        if ctx.distributed:
            checks += check_shared_run_dir(ctx, run_dir)
            every = [None] * ctx.world_size
            dist.all_gather_object(every, (socket.gethostname(), checks))
            mine = set(checks)      # other ranks' findings that rank 0 does not share (another node's setup)
            checks += [Check(c.level, f"rank {r} on {host}: {c.text}") for r, (host, cs) in enumerate(every)
                       if r for c in cs if c.level != "ok" and c not in mine]
    finally:
        shutdown(ctx)
    if ctx.is_main:
        for c in checks:
            print(f"{c.level:<8} {c.text}")
        bad = sum(c.level == "problem" for c in checks)
        print(f"{bad} problem(s), {sum(c.level == 'warning' for c in checks)} warning(s)", file=sys.stderr if bad else sys.stdout)
    return 1 if any(c.level == "problem" for c in checks) else 0
