"""Pipeline parallel with torch.distributed.pipelining: split the layers into stages and build a
schedule (GPipe, 1F1B, interleaved 1F1B, interleaved zero-bubble); the engine step that runs it is
parallel/pipeline_engine.py.

Stages are the model itself with other stages' parts removed: the first keeps the embeddings,
the last the final norm and head (and computes the loss); layer keys keep their original names,
so parameter names match the unsplit model. A rank holds `pp_virtual_stages` stages in loop
order (rank r holds stages r, r+pp, ...), so the last stage is always on pp rank pp-1.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (PipelineScheduleMulti, Schedule1F1B, ScheduleGPipe,
                                                    ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble)

from core.layout import microbatches, stage_layer_counts
from core.parallel_config import ParallelConfig
from core.parallel_plan import ParallelPlan
from parallel.dist_engine import full_value
from parallel.local_engine import aux_loss, aux_weight, token_loss_sum

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B,
             "zero_bubble": ScheduleInterleavedZeroBubble}


class AttachAux(torch.autograd.Function):
    """Passes a stage's output through unchanged and, in backward, gives its blocks' aux loss the
    gradient `weight` (Megatron's MoEAuxLossAutoScaler, with the weight passed in, not global):
    the MoE balancing losses of every stage reach the gradient without travelling to the last
    stage's loss, whatever the schedule does with the output (send it on, or take the loss)."""

    @staticmethod
    def forward(ctx, output, aux, weight):
        ctx.save_for_backward(weight)
        return output

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad, weight, None


def split_model(model: nn.Module, plan: ParallelPlan, stage: int, counts: list[int]) -> nn.Module:
    """A copy of `model` holding only stage `stage`'s layers (and the ends it owns)."""
    start = sum(counts[:stage])
    keep = {str(i) for i in range(start, start + counts[stage])}
    part = copy.deepcopy(model)
    blocks = getattr(part, plan.blocks)
    for key in list(blocks.keys()):
        if key not in keep:
            del blocks[key]
    ends = ([plan.embedding, plan.positions] if stage > 0 else []) + \
           ([plan.final_norm, plan.head] if stage < len(counts) - 1 else [])
    for name in ends:
        setattr(part, name, None)
    return part


@dataclass
class PipelineSetup:
    """This rank's stages and, once the data-parallel wrappers are on, the schedule over them."""
    stage_ids: list[int]
    n_stages: int
    dims: object
    device: torch.device
    modules: list[nn.Module] = field(default_factory=list)
    schedule: object = None
    divisor: torch.Tensor | float = 1.0
    n_micro: int = 1
    seq_shards: int = 1                                   # TP ranks under SP (local_engine.aux_weight)
    aux_weights: list = field(default_factory=list)      # per microbatch of the running step
    aux_seen: list = field(default_factory=list)         # per stage: its forwards of the running step
    stateful: bool = False      # the stages' blocks keep per-step counters (MoE): see `run`
    warmed_up: bool = False

    @property
    def has_first(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last(self) -> bool:
        return self.n_stages - 1 in self.stage_ids

    def loss_fn(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """A microbatch's summed token losses over the step's divisor (parallel/local_engine.py):
        the schedule runs backward on it, so a microbatch without a labelled token adds 0."""
        return token_loss_sum(logits, labels) / self.divisor

    def build_schedule(self, parts: list[nn.Module], pcfg: ParallelConfig) -> None:
        self.modules = parts
        group = self.dims.pp_mesh.get_group()
        stages = [PipelineStage(part, sid, self.n_stages, self.device, group=group)
                  for part, sid in zip(parts, self.stage_ids)]
        cls = SCHEDULES[pcfg.pp_schedule]
        n_micro = microbatches(pcfg)
        # scale_grads=False: the schedule would divide all of a stage's gradients by n_micro after
        # each step, also those accumulated by earlier steps of a gradient-accumulation window;
        # the loss carries the global batch's divisor instead.
        kwargs = dict(n_microbatches=n_micro, loss_fn=self.loss_fn, scale_grads=False)
        self.n_micro = n_micro
        self.seq_shards = self.dims.tp if self.dims.tp > 1 and pcfg.sp else 1
        self.aux_seen = [0] * len(parts)
        for i, part in enumerate(parts):
            part.register_forward_hook(self._aux_hook(i))
        self.schedule = cls(stages, **kwargs) if issubclass(cls, PipelineScheduleMulti) else cls(stages[0], **kwargs)

    def _aux_hook(self, index: int):
        """A forward hook on stage part `index`: its blocks' aux loss (MoE) of this forward is
        attached to the output with the weight of the microbatch (the stage's forwards of a step
        come in microbatch order in every schedule)."""
        def hook(module, args, output):
            aux = aux_loss(module)
            if aux is None or not torch.is_grad_enabled() or not self.warmed_up:
                return None
            k = self.aux_seen[index]
            self.aux_seen[index] += 1
            return AttachAux.apply(output, aux, self.aux_weights[k])
        return hook

    def _discarded_pass(self, inputs, labels) -> None:
        """torch's stages learn their shapes in their first training step by running the stage
        once more on the first microbatch (torch 2.13: with backward; a later stage's input is
        uninitialised memory), which a model's step counters (MoE expert loads) would count. With
        such counters the first training pass runs once and is thrown away: gradients dropped,
        buffers restored. Costs one extra pipelined pass per process, nothing else."""
        self.warmed_up = True
        if not self.stateful:
            return
        buffers = [(b, b.clone()) for part in self.modules for b in part.buffers()]
        args = (inputs,) if self.has_first else ()
        self.warmed_up = False          # no aux attached in this pass
        self.schedule.step(*args, target=labels if self.has_last else None, losses=[] if self.has_last else None)
        self.warmed_up = True
        for part in self.modules:
            part.zero_grad(set_to_none=True)
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)

    def run(self, inputs, labels, train: bool = True, divisor: torch.Tensor | float = 1.0) -> torch.Tensor | None:
        """One pipelined pass over a batch; on the last stage returns the sum of its token losses
        divided by `divisor` (the sum of the microbatch losses)."""
        self.divisor = divisor
        # every stage holds the labels: the aux weights of the microbatches, split as the schedule splits
        self.aux_weights = [aux_weight(chunk, divisor, self.seq_shards)
                            for chunk in torch.tensor_split(labels, self.n_micro)]
        self.aux_seen = [0] * len(self.aux_seen)
        if train and not self.warmed_up:
            self._discarded_pass(inputs, labels)
        losses: list = []
        if not train and not hasattr(self.schedule, "eval"):
            raise RuntimeError("pipeline evaluation needs PipelineSchedule.eval (newer torch); set train.eval_every = 0 "
                               "and evaluate after training without parallel.pp")
        step = self.schedule.step if train else self.schedule.eval
        args = (inputs,) if self.has_first else ()
        step(*args, target=labels if self.has_last else None, losses=losses if self.has_last else None)
        if not self.has_last:
            return None
        return torch.stack([full_value(l).detach() for l in losses]).sum()


def split_stages(model: nn.Module, plan: ParallelPlan, dims, pcfg: ParallelConfig, device: torch.device) -> PipelineSetup:
    counts = stage_layer_counts(pcfg, len(getattr(model, plan.blocks)))
    stage_ids = [dims.pp_rank + k * dims.pp for k in range(pcfg.pp_virtual_stages)]
    setup = PipelineSetup(stage_ids=stage_ids, n_stages=len(counts), dims=dims, device=device,
                          stateful=bool(plan.moe_router) and any(
                              name.endswith(plan.moe_router) for name, _ in model.named_modules()))
    setup.modules = [split_model(model, plan, sid, counts) for sid in stage_ids]
    return setup
