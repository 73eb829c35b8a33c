"""Loss parity: every parallel layout gives the single-process loss (within 1e-5 relative) and the
same gradient norm at every step, in fp32 on CPU with gloo, on the real data stream (the loader
gives every layout of one global batch the same sequences: data/README.md).

Each launch runs several layouts (tests/parallel/layouts.py) to amortise process start-up.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from webdataset import TarWriter

from tests.parallel.layouts import INIT_FILE, STEPS, run_layout

ROOT = Path(__file__).resolve().parents[2]
RTOL = 1e-5

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
# The Switch aux loss ON under PP: its value is per micro-batch, so the reference cuts its global batch
# into the same micro-batches (accumulation of 4 x 2 rows = the pipeline's 4 microbatches of 2 rows):
# the aux of both stages' blocks reaches the gradient with each microbatch's weight.
ALIGNED = {"pp2_gpipe_moe_aux": ("--parallel.pp 2 --parallel.pp_schedule gpipe --parallel.pp_microbatches 4 "
                                 "--model.moe_experts 4 --model.moe_aux_coef 0.1 --model.moe_z_coef 0.1 "
                                 "--model.moe_bias_rate 0.01", "--train.batch_size 2 --train.grad_accum 4")}
TWO_RANKS.update(RESUMES)
TWO_RANKS.update(CAPACITY)
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """The EPOCH_END corpus: one shard of 13 documents of 30 bytes, as a data.urls value."""
    path = tmp_path_factory.mktemp("corpus") / "docs-0000.tar"
    with TarWriter(str(path)) as w:
        for i in range(13):
            w.write({"__key__": f"d{i:02d}", "txt": f"def f{i}(x):\n    return x * {i}\n".ljust(30).encode()})
    return json.dumps([str(path)]).replace(" ", "")


def launch(nproc: int, layouts: dict[str, str], tmp: Path, timeout: float, corpus: str = "CORPUS",
           docs: str = "DOCS") -> dict:
    """One torchrun launch running `layouts`; CORPUS and DOCS in their arguments become `corpus`
    and `docs`."""
    out = tmp / f"results-{nproc}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(ROOT / "tests/parallel/layouts.py"), str(out)] + [
        f"{k}={v.replace('CORPUS', corpus).replace('DOCS', docs)}" for k, v in layouts.items()]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", ND_DUMP_AFTER=str(timeout - 10))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if not out.exists():
        pytest.fail(f"launch of {nproc} ranks wrote no results (rc {proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


def model_args(layout: str) -> list[str]:
    """The non-parallel overrides of a layout: its single-process reference uses the same ones."""
    words = layout.split()
    words = words[words.index("RESUME") + 1:] if "RESUME" in words else words
    pairs = zip(words[::2], words[1::2])
    return [w for k, v in pairs if not k.startswith("--parallel.") for w in (k, v)]


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> str:
    """Packed short documents for the doc-masked rows: 700 functions of 40 to 150 bytes (about
    12 documents per 1024-token row, ~1.2 epochs over 10 steps of 8 rows), as a data.urls value."""
    path = tmp_path_factory.mktemp("docs") / "docs-0000.tar"
    with TarWriter(str(path)) as w:
        for i in range(700):
            body = "".join(f"    x = x * {j} + {i}\n" for j in range(i % 6))
            w.write({"__key__": f"f{i:04d}", "txt": f"def f{i}(x):\n{body}    return x\n".encode()})
    return json.dumps([str(path)]).replace(" ", "")


@pytest.fixture(scope="module")
def references(tmp_path_factory, corpus, docs):
    """Single-process runs, one per model variant, computed here on first use."""
    cache: dict = {}

    def get(layout: str) -> dict:
        key = " ".join(model_args(layout.replace("CORPUS", corpus).replace("DOCS", docs)))
        if key not in cache:
            cache[key] = run_layout(str(tmp_path_factory.mktemp("ref") / "single"), key.split())
        return cache[key]
    return get


@pytest.fixture(scope="module")
def reference(references):
    return references("")


def check(name: str, got: dict, ref: dict) -> None:
    if name in XFAIL:
        pytest.xfail(XFAIL[name])
    assert "error" not in got, f"{name} failed:\n{got.get('error')}"
    assert len(got["loss"]) == STEPS
    assert got["loss"] == pytest.approx(ref["loss"], rel=RTOL), name
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=RTOL), name
    assert got["val_loss"] == pytest.approx(ref["val_loss"], rel=RTOL), name


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory, corpus, docs):
    return launch(2, TWO_RANKS, tmp_path_factory.mktemp("two"), timeout=600, corpus=corpus, docs=docs)


@pytest.fixture(scope="module")
def four_rank_results(tmp_path_factory, docs):
    return launch(4, FOUR_RANKS, tmp_path_factory.mktemp("four"), timeout=900, docs=docs)


@pytest.fixture(scope="module")
def eight_rank_results(tmp_path_factory):
    return launch(8, EIGHT_RANKS, tmp_path_factory.mktemp("eight"), timeout=800)


def test_reference_trains(reference):
    """The single-process baseline itself learns (so parity is not parity of a broken run)."""
    assert len(reference["loss"]) == STEPS and reference["loss"][-1] < reference["loss"][0]


@pytest.mark.parametrize("name", [n for n in TWO_RANKS
                                  if n not in RESUMES and n not in INIT_FROM and n not in ALIGNED and n not in CAPACITY])
def test_two_rank_parity(name, two_rank_results, references):
    check(name, two_rank_results[name], references(TWO_RANKS[name]))


@pytest.mark.parametrize("name", list(RESUMES))
def test_resume_across_engines(name, two_rank_results, references):
    """Steps 1-5 in one layout, a checkpoint, steps 6-10 resumed in another: the uninterrupted
    single-process run's losses and gradient norms at every step (the optimizer state, step count
    and data position all came through), and its final validation loss."""
    got, ref = two_rank_results[name], references(RESUMES[name])
    assert "error" not in got, f"{name} failed:\n{got.get('error')}"
    assert got["loss"] == pytest.approx(ref["loss"], rel=RTOL), name
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=RTOL), name
    assert got["val_loss"][-1] == pytest.approx(ref["val_loss"][-1], rel=RTOL), name


@pytest.mark.parametrize("name", list(ALIGNED))
def test_aux_loss_under_pipeline(name, two_rank_results, references):
    """Against the single process whose micro-batches are the pipeline's microbatches."""
    layout, reference_args = ALIGNED[name]
    check(name, two_rank_results[name], references(f"{layout} {reference_args}"))


def test_expert_parallel_drops_what_fsdp_drops(two_rank_results):
    """Capacity 1 under ep 2 and under FSDP x2 (the same micro-batches, so the same per-rank
    routing and drops): the same losses, gradient norms and dropped share, and some were dropped
    (the metric sums the ranks' own counts, which the all-to-all does not change)."""
    got, want = two_rank_results["ep2_capacity"], two_rank_results["fsdp2_capacity"]
    for r in (got, want):
        assert "error" not in r, r.get("error")
    assert got["loss"] == pytest.approx(want["loss"], rel=RTOL)
    assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=RTOL)
    assert len(got["moe_dropped"]) == CAPACITY_STEPS and min(got["moe_dropped"]) > 0
    assert got["moe_dropped"] == pytest.approx(want["moe_dropped"], rel=RTOL)


@pytest.mark.parametrize("name", list(INIT_FROM))
def test_init_from_weights(name, two_rank_results, references):
    """checkpoint.init_from of a safetensors file: the single process loading the same file."""
    got = two_rank_results[name]
    assert "error" not in got, f"{name} failed:\n{got.get('error')}"
    weights = str(Path(got["run_dir"]).parent / INIT_FILE)
    check(name, got, references(INIT_FROM[name].replace("INIT_WEIGHTS", weights)))


def assert_exports_to_transformers(run_dir: Path, out: Path) -> None:
    """`meshformer export` of the run's newest checkpoint gives a Llama folder that transformers
    loads, with the logits our model gives with the checkpoint's weights (within 1e-5: fp32, the
    same ops in another order)."""
    transformers = pytest.importorskip("transformers")
    from trainer.checkpoint import complete_checkpoints, load_model_weights
    from trainer.export import main as export_main
    from trainer.model import Transformer
    from core.run_config import load_config
    assert export_main([str(run_dir), "--out", str(out)]) == 0
    hf = transformers.LlamaForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32).eval()
    ours = Transformer(load_config(str(run_dir / "config.toml")).model).eval()
    load_model_weights(ours, complete_checkpoints(run_dir / "checkpoints")[-1])
    tokens = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ours(tokens), hf(tokens).logits
    assert (got - want).abs().max().item() < 1e-5 and want.std() > 0.1


def test_deepspeed_checkpoint_exports_to_transformers(two_rank_results, tmp_path):
    """The step-5 checkpoint ZeRO-3 wrote (ds_zero3_to_fsdp's first half) is our format."""
    from trainer.checkpoint import complete_checkpoints
    run_dir = Path(two_rank_results["ds_zero3_to_fsdp"]["run_dir"])
    assert [c.name for c in complete_checkpoints(run_dir / "checkpoints")] == ["step-00000005"]
    assert_exports_to_transformers(run_dir, tmp_path / "hf")


def test_native_deepspeed_checkpoint_comes_in(two_rank_results, tmp_path):
    """Both ways between DeepSpeed's own checkpoint and ours. checkpoint.deepspeed_native made
    ZeRO-3 write engine.save_checkpoint's global_step5/ next to our step-5 checkpoint; DeepSpeed's
    zero_to_fp32 turns it into a safetensors file holding exactly our checkpoint's weights (the same
    fp32 master fragments, gathered two ways); a new run's checkpoint.init_from loads that file bit
    for bit, and that run exports to transformers. The new run trains one step at lr 1e-30 (lr must
    be > 0): Adam's first update is at most lr per weight, below half an fp32 ulp of any weight
    above ~1e-22 in size, and its weight decay factor 1 - lr*wd rounds to 1, so nothing moves."""
    from safetensors.torch import load_file
    from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict
    from trainer.checkpoint import complete_checkpoints, load_model_weights
    from trainer.model import Transformer
    from trainer.train import train
    from core.run_config import load_config
    run_dir = Path(two_rank_results["ds_zero3_to_fsdp"]["run_dir"])
    native = complete_checkpoints(run_dir / "checkpoints")[-1] / "deepspeed"
    assert (native / "latest").read_text().strip() == "global_step5"
    convert_zero_checkpoint_to_fp32_state_dict(str(native), str(tmp_path / "fp32"), tag="global_step5",
                                               safe_serialization=True)
    converted = load_file(str(tmp_path / "fp32" / "model.safetensors"))
    cfg = load_config(str(run_dir / "config.toml"))
    ours = Transformer(cfg.model)
    load_model_weights(ours, complete_checkpoints(run_dir / "checkpoints")[-1])
    want = ours.state_dict()
    assert set(converted) <= set(want) and converted
    for name, value in converted.items():
        assert torch.equal(value, want[name]), name

    new_dir = tmp_path / "from_native"
    train(load_config(str(run_dir / "config.toml"), [
        "--run.dir", str(new_dir), "--parallel.dp_shard", "1", "--train.steps", "1", "--optim.lr", "1e-30",
        "--optim.warmup_steps", "0", "--train.eval_every", "0", "--checkpoint.final", "true",
        "--checkpoint.init_from", str(tmp_path / "fp32" / "model.safetensors")]))
    loaded = Transformer(cfg.model)
    load_model_weights(loaded, complete_checkpoints(new_dir / "checkpoints")[-1])
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, want[name]), name
    assert_exports_to_transformers(new_dir, tmp_path / "hf")


def test_zero3_offload_matches_zero3(two_rank_results):
    """ZeRO-Offload/Infinity on the CPU (optimizer state and parameters) changes where tensors
    live, not the arithmetic: the same losses as ZeRO-3 within RTOL at every step."""
    off, on_device = two_rank_results["ds_zero3_offload"], two_rank_results["ds_zero3"]
    assert "error" not in off and "error" not in on_device, off.get("error") or on_device.get("error")
    assert off["loss"] == pytest.approx(on_device["loss"], rel=RTOL)
    assert off["grad_norm"] == pytest.approx(on_device["grad_norm"], rel=RTOL)


@pytest.mark.parametrize("name", list(FOUR_RANKS))
def test_four_rank_parity(name, four_rank_results, references):
    check(name, four_rank_results[name], references(FOUR_RANKS[name]))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EIGHT_RANKS))
def test_eight_rank_parity(name, eight_rank_results, references):
    check(name, eight_rank_results[name], references(EIGHT_RANKS[name]))
