"""The parity rows: each a layout's `--parallel.*` overrides (and the model/data options its
single-process reference shares), grouped by how many ranks their torchrun launch has
(tests/parallel/test_parity.py runs them; tests/parallel/layouts.py trains them)."""
from __future__ import annotations

import os

# A padded epoch end: 13 documents of 30 bytes are 403 positions (end-of-text included), cut into
# G = 16 lanes of 25 or 26 (data/plan.py). At seq_len 7 an epoch is 4 steps and its last holds a
# label in rows 5, 10 and 15 only: DDP rank 0's first micro-batch (rows 0-3) and the pipeline's
# first two microbatches (rows 0-1, 2-3) have none. The evaluation covers the whole (padded) pass.
EPOCH_END = "--data.urls CORPUS --data.val_urls CORPUS --train.seq_len 7 --train.grad_accum 2 --train.eval_batches 4"

MOE = "--model.moe_experts 4 --model.moe_aux_coef 0 --model.moe_z_coef 0.1 --model.moe_bias_rate 0.01"
# the MoE of fsdp2_moe_bias_shared (z-loss at its default 1e-3), for the expert-parallel rows
MOE_SHARED = "--model.moe_experts 4 --model.moe_aux_coef 0 --model.moe_bias_rate 0.01 --model.moe_shared_experts 1 " \
             "--model.moe_hidden 32"
TWO_RANKS = {
    "ddp2": "--parallel.dp_replicate 2 --parallel.dp_shard 1",
    "fsdp2": "--parallel.dp_shard 2",
    "fsdp2_keep_offload": "--parallel.dp_shard 2 --parallel.fsdp_reshard_after_forward false "
                          "--parallel.fsdp_cpu_offload true",
    "tp2_sp": "--parallel.tp 2",
    "tp2_no_sp": "--parallel.tp 2 --parallel.sp false",
    # the model's variants under TP+SP: positions applied on full sequences, sharded ALiBi slopes,
    # post-norm residuals, LayerNorm with biases, GELU MLP, a tied vocab-parallel head
    "tp2_sp_learned_gelu_ln": "--parallel.tp 2 --model.position learned --model.norm layernorm --model.bias true "
                              "--model.activation gelu",
    "tp2_sp_alibi_postnorm": "--parallel.tp 2 --model.position alibi --model.norm_position post",
    # T5 relative bias: the [buckets, heads] table a parameter sharded with the heads (ColwiseParallel)
    "tp2_sp_relative": "--parallel.tp 2 --model.position relative --model.rel_buckets 8 --model.rel_max_distance 16",
    "tp2_sp_sinusoidal_tied": "--parallel.tp 2 --model.position sinusoidal --model.tie_embeddings true",
    # muP under TP+SP: the 1/m logit multiplier on a tied vocab-parallel head, the sqrt(base)/head_dim
    # attention scale on sharded heads, the hidden matrices' own LR group over DTensors
    "tp2_sp_mup_tied": "--parallel.tp 2 --model.parametrization mup --model.mup_base_dim 16 --model.tie_embeddings true",
    # document masking + a sliding window with a global layer under TP+SP (issue 20): per-document
    # positions and doc ids pass the blocks' sequence sharding; CORPUS's 30-byte documents put an
    # end-of-text in every 32-token row, so the mask matters
    "tp2_sp_docmask_window": "--parallel.tp 2 --model.doc_mask true --model.attn_window 8 --model.attn_global_every 2 "
                             "--data.urls CORPUS --data.val_urls CORPUS",
    "ddp2_accum2": "--parallel.dp_replicate 2 --parallel.dp_shard 1 --train.grad_accum 2",   # no_sync path
    "pp2_gpipe": "--parallel.pp 2 --parallel.pp_schedule gpipe",
    "pp2_1f1b": "--parallel.pp 2 --parallel.pp_schedule 1f1b --parallel.pp_microbatches 4",
    "pp2_1f1b_uneven_accum2": "--parallel.pp 2 --parallel.pp_layers 1,3 --train.grad_accum 2",
    "pp2_interleaved_1f1b": "--parallel.pp 2 --parallel.pp_schedule interleaved_1f1b --parallel.pp_virtual_stages 2",
    "pp2_zero_bubble": "--parallel.pp 2 --parallel.pp_schedule zero_bubble --parallel.pp_virtual_stages 2",
    "ddp2_accum2_epoch_end": "--parallel.dp_replicate 2 --parallel.dp_shard 1 " + EPOCH_END,
    "tp2_no_sp_epoch_end": "--parallel.tp 2 --parallel.sp false " + EPOCH_END,   # SP needs seq_len % tp == 0
    # MoE (issue 19): z-loss and the DeepSeek-V3 bias (loads summed over ranks) are layout-independent;
    # the Switch aux loss is per micro-batch by design (parallel/README.md), so it is off here.
    "fsdp2_moe_bias_shared": "--parallel.dp_shard 2 " + MOE_SHARED,
    "ddp2_accum2_moe_sigmoid_every2": "--parallel.dp_replicate 2 --parallel.dp_shard 1 --train.grad_accum 2 "
                                      "--model.moe_experts 4 --model.moe_aux_coef 0 --model.moe_router sigmoid "
                                      "--model.moe_every 2",
    # MoE under TP+SP (issue 19): router and routed experts replicated, run on the rank's sequence shard
    # (Partial gradients summed over TP, loads summed over dp x tp, z-loss weighted 1/tp), shared experts
    # split like a dense MLP; and under PP (the z-loss of stage 0's blocks through AttachAux). z-loss
    # raised to 0.1 so a wrong weight of it shows in the gradient norm.
    "tp2_sp_moe": "--parallel.tp 2 " + MOE + " --model.moe_shared_experts 1 --model.moe_hidden 32",
    "pp2_1f1b_moe": "--parallel.pp 2 --parallel.pp_schedule 1f1b --parallel.pp_microbatches 4 " + MOE,
    # Expert parallel (parallel/expert.py): each rank holds 2 of the 4 experts, tokens go by all-to-all;
    # the same MoE (z-loss and bias on, Switch aux off as above) and the same reference as fsdp2_moe.
    "ep2": "--parallel.ep 2 " + MOE_SHARED,
    # ... with gradient accumulation, sigmoid routing, dense blocks between MoE ones and full activation
    # checkpointing (the recompute runs the all-to-alls again); ddp2_accum2_moe_sigmoid_every2's reference
    "ep2_accum2_ac_sigmoid_every2": "--parallel.ep 2 --parallel.ac full --train.grad_accum 2 --model.moe_experts 4 "
                                    "--model.moe_aux_coef 0 --model.moe_router sigmoid --model.moe_every 2",
    "pp2_1f1b_epoch_end": "--parallel.pp 2 --parallel.pp_schedule 1f1b --parallel.pp_microbatches 4 " + EPOCH_END,
    # parallel.engine = deepspeed (parallel/deepspeed_engine.py): DeepSpeed's ZeRO step with our AdamW
    "ds_zero1": "--parallel.engine deepspeed --parallel.zero_stage 1",
    "ds_zero2_accum2": "--parallel.engine deepspeed --parallel.zero_stage 2 --train.grad_accum 2",
    "ds_zero3": "--parallel.engine deepspeed --parallel.zero_stage 3",
    "ds_zero3_offload": "--parallel.engine deepspeed --parallel.zero_stage 3 --parallel.offload_optimizer cpu "
                        "--parallel.offload_param cpu",
    "ds_zero2_moe": "--parallel.engine deepspeed --parallel.zero_stage 2 --train.grad_accum 2 " + MOE +
                    " --model.moe_shared_experts 1 --model.moe_hidden 32",   # aux and after_step in DeepSpeed's step
    "ds_zero2_epoch_end": "--parallel.engine deepspeed --parallel.zero_stage 2 " + EPOCH_END,
}
# Weights from a safetensors file (layouts.py writes it: another seed's initial weights): ZeRO-3
# scatters them into its fragments as a single process loads them.
INIT_FROM = {"ds_zero3_init_from": "--parallel.engine deepspeed --parallel.zero_stage 3 "
                                   "--checkpoint.init_from INIT_WEIGHTS"}
# Checkpoint and resume (layouts.py's RESUME: half the steps, save, resume in the same folder):
# DeepSpeed saves our DCP format (parallel/deepspeed_state.py), so ZeRO resumes itself exactly and
# a checkpoint moves between engines both ways. A constant LR: the first half's train.steps is shorter.
DS = "--parallel.engine deepspeed --parallel.zero_stage"
CONST = " --optim.schedule constant"
RESUMES = {
    "ds_zero2_resume": f"{DS} 2{CONST} RESUME {DS} 2{CONST}",
    # its step-5 checkpoint also holds DeepSpeed's native one (test_native_deepspeed_checkpoint_comes_in)
    "ds_zero3_to_fsdp": f"{DS} 3{CONST} --checkpoint.deepspeed_native true RESUME --parallel.dp_shard 2{CONST}",
    # Expert weights keep their unsplit [E, ...] names and shapes (Shard(0) DTensors), so DCP moves a
    # checkpoint between ep and no ep both ways, expert biases and AdamW moments included.
    "ep2_to_fsdp2": f"--parallel.ep 2 {MOE_SHARED}{CONST} RESUME --parallel.dp_shard 2 {MOE_SHARED}{CONST}",
    "fsdp2_to_ep2": f"--parallel.dp_shard 2 {MOE_SHARED}{CONST} RESUME --parallel.ep 2 {MOE_SHARED}{CONST}",
    "fsdp_to_ds_zero3_offload": f"--parallel.dp_shard 2{CONST} RESUME {DS} 3 --parallel.offload_optimizer cpu "
                                f"--parallel.offload_param cpu{CONST}",
}
# A capacity limit is per micro-batch (parallel/README.md), so no single-process run shares its drops;
# expert parallel keeps each rank's micro-batch and routing, so it must drop what FSDP drops
# (compared with each other only: 3 steps are enough and keep the launch short).
CAPACITY_STEPS = 3
CAPACITY = {"ep2_capacity": f"--parallel.ep 2 --model.moe_capacity_factor 1 --train.steps {CAPACITY_STEPS} {MOE_SHARED}",
            "fsdp2_capacity": f"--parallel.dp_shard 2 --model.moe_capacity_factor 1 --train.steps {CAPACITY_STEPS} {MOE_SHARED}"}
# The Sinkhorn choice is per micro-batch too (no bias: the two are refused together): expert parallel
# must route each rank's tokens as FSDP does, before the all-to-all.
MOE_SINKHORN = MOE_SHARED.replace("--model.moe_bias_rate 0.01", "--model.moe_sinkhorn_iters 10")
SINKHORN = {"ep2_sinkhorn": f"--parallel.ep 2 --train.steps {CAPACITY_STEPS} {MOE_SINKHORN}",
            "fsdp2_sinkhorn": f"--parallel.dp_shard 2 --train.steps {CAPACITY_STEPS} {MOE_SINKHORN}"}
# The Switch aux loss ON under PP: its value is per micro-batch, so the reference cuts its global batch
# into the same micro-batches (accumulation of 4 x 2 rows = the pipeline's 4 microbatches of 2 rows):
# the aux of both stages' blocks reaches the gradient with each microbatch's weight.
ALIGNED = {"pp2_gpipe_moe_aux": ("--parallel.pp 2 --parallel.pp_schedule gpipe --parallel.pp_microbatches 4 "
                                 "--model.moe_experts 4 --model.moe_aux_coef 0.1 --model.moe_z_coef 0.1 "
                                 "--model.moe_bias_rate 0.01", "--train.batch_size 2 --train.grad_accum 4"),
           # the Sinkhorn choice per pipeline microbatch = per accumulation micro-batch of the reference
           "pp2_gpipe_moe_sinkhorn": ("--parallel.pp 2 --parallel.pp_schedule gpipe --parallel.pp_microbatches 4 "
                                      "--model.moe_experts 4 --model.moe_aux_coef 0 --model.moe_z_coef 0.1 "
                                      "--model.moe_sinkhorn_iters 10", "--train.batch_size 2 --train.grad_accum 4")}
TWO_RANKS.update(RESUMES)
TWO_RANKS.update(CAPACITY)
TWO_RANKS.update(SINKHORN)
TWO_RANKS.update({name: layout for name, (layout, _) in ALIGNED.items()})
TWO_RANKS.update(INIT_FROM)
# Context parallel (parallel/context.py) at a long sequence: 1024 tokens in 2 x cp chunks, so the
# ring's blocks, the skipped future keys and several query tiles (QUERY_TILE 64) all take part.
# The doc-masked rows read DOCS (short documents, ~12 per row: the built-in corpus's files are
# longer than a row, so few rows there hold an end-of-text), so chunks attend across documents'
# boundaries, within a document across ranks, and some queries see nothing of a block.
# The ring at 1024 is ~30 s a row on 2 cores (explicit fp32 blocks, query tiles recomputed in
# backward): cp2 and cp2_doc run at 1024 in every run; the other rows (the compositions) at
# MESHFORMER_CP_PARITY_SEQ, 256 by default (at cp 4 still 8 chunks of 32, zigzag, skipped
# blocks, ~3 documents a row) and 1024 for the acceptance run (parallel/README.md, "Context parallel").
CP_SEQ_LONG = "--train.seq_len 1024 --model.max_seq_len 1024"
CP_LEN = int(os.environ.get("MESHFORMER_CP_PARITY_SEQ", "256"))
CP_SEQ = f"--train.seq_len {CP_LEN} --model.max_seq_len {max(CP_LEN, 256)}"
DOC = "--model.doc_mask true --data.urls DOCS --data.val_urls DOCS"
CP_DOC = f"{CP_SEQ} {DOC}"
TWO_RANKS["cp2"] = f"--parallel.cp 2 {CP_SEQ_LONG}"
TWO_RANKS["cp2_doc"] = f"--parallel.cp 2 {CP_SEQ_LONG} {DOC}"
TWO_RANKS["cp2_allgather_doc"] = f"--parallel.cp 2 --parallel.cp_kv allgather {CP_DOC}"
# the learned relative bias (a parameter inside each block's mask) across the ring, short and cheap
TWO_RANKS["cp2_relative"] = "--parallel.cp 2 --train.seq_len 64 --model.position relative"
FOUR_RANKS = {
    "hsdp2x2": "--parallel.dp_replicate 2 --parallel.dp_shard 2",
    "tp2_fsdp2": "--parallel.tp 2 --parallel.dp_shard 2",
    "pp2_tp2": "--parallel.pp 2 --parallel.tp 2",
    "pp2_fsdp2": "--parallel.pp 2 --parallel.dp_shard 2",
    "pp2_ddp2": "--parallel.pp 2 --parallel.dp_replicate 2 --parallel.dp_shard 1",
    # MoE: the aux weights and loads of TP+SP inside pipeline stages; FSDP reducing the Partial gradients
    "pp2_tp2_moe": "--parallel.pp 2 --parallel.tp 2 " + MOE + " --model.moe_shared_experts 1 --model.moe_hidden 32",
    "tp2_fsdp2_moe": "--parallel.tp 2 --parallel.dp_shard 2 " + MOE + " --model.moe_every 2",
    # experts split over ep 2 and FSDP-sharded over the other 2 (edp_shard); dense parts over all 4
    "ep2_fsdp2": "--parallel.dp_shard 4 --parallel.ep 2 " + MOE_SHARED,
    # Expert parallel with the dense parts' TP+SP (experts Replicate over tp on the (ep, tp) mesh, each TP
    # rank dispatching its sequence shard) and inside pipeline stages; tp2_sp_moe's and pp2_1f1b_moe's references
    "ep2_tp2": "--parallel.tp 2 --parallel.ep 2 " + MOE + " --model.moe_shared_experts 1 --model.moe_hidden 32",
    "pp2_ep2": "--parallel.pp 2 --parallel.pp_schedule 1f1b --parallel.pp_microbatches 4 --parallel.ep 2 " + MOE,
    "cp4": f"--parallel.cp 4 {CP_SEQ}",
    "cp2_fsdp2": f"--parallel.cp 2 --parallel.dp_shard 2 {CP_SEQ}",
    "cp2_tp2": f"--parallel.cp 2 --parallel.tp 2 {CP_SEQ}",   # heads over tp, the sequence over cp, SP on
    "cp4_doc": f"--parallel.cp 4 {CP_DOC}",
    "cp2_fsdp2_doc": f"--parallel.cp 2 --parallel.dp_shard 2 {CP_DOC}",
    "cp2_tp2_doc": f"--parallel.cp 2 --parallel.tp 2 {CP_DOC}",
    # HSDP x CP (FSDP's 2-D mesh: dp_replicate x dp_shard_cp), at a short sequence: cheap
    "cp2_hsdp2": "--parallel.cp 2 --parallel.dp_replicate 2 --parallel.dp_shard 1 --train.seq_len 64",
}
EIGHT_RANKS = {
    "pp2_tp2_fsdp2": "--parallel.pp 2 --parallel.tp 2 --parallel.dp_shard 2",
}
XFAIL: dict[str, str] = {}
