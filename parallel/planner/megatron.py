"""Narayanan et al. (SC'21, arXiv 2104.04473) Table 1 as planner inputs, and the side-by-side table.

Each row becomes a ModelConfig (GPT: vocab 51200, seq 2048, GELU MLP of 4h, MHA, LayerNorm with
biases, learned positions, tied embeddings) and the layout the paper ran (mixed precision, full
activation recomputation, 1F1B or the interleaved schedule, plain data parallelism). The stack is
`megatron_sc21()`; the hardware constants are the a100-80gb profile's, the same for every row.

`python -m parallel.planner.megatron` prints the comparison.
"""
from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass
from pathlib import Path

from core.model_config import ModelConfig

from .cluster import ClusterProfile, load_cluster
from .layout import Layout, deepspeed_zero3_sc21, megatron_sc21
from .predict import Prediction, predict

TABLE1 = Path(__file__).resolve().parent / "refdata" / "megatron_table1.csv"   # shipped with the package
VOCAB, SEQ = 51200, 2048


def table1_path() -> Path:
    return TABLE1


@dataclass(frozen=True)
class Row:
    params_billion: float
    model: ModelConfig
    layout: Layout
    published_tflops: float
    flops_per_iter: float        # the paper's eq. (3), as derived in the CSV


def gpt_config(h: int, layers: int, heads: int) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, dim=h, n_layers=layers, n_heads=heads, activation="gelu",
                       norm="layernorm", bias=True, position="learned", max_seq_len=SEQ, tie_embeddings=True)


def load_rows(path: Path | None = None) -> list[Row]:
    rows = []
    with open(path or table1_path()) as f:
        for r in csv.DictReader(f):
            h, l, a = int(r["hidden_size"]), int(r["num_layers"]), int(r["attention_heads"])
            t, p, n = int(r["tensor_parallel"]), int(r["pipeline_parallel"]), int(r["num_gpus"])
            B, mbs = int(r["global_batch_size"]), int(r["micro_batch_size_sc21_script"])
            dp = n // (t * p)
            per_vstage = r["layers_per_virtual_stage_sc21_script"]
            v = (l // p) // int(per_vstage) if per_vstage else 1
            layout = Layout(tp=t, pp=p, pp_virtual_stages=v, dp_replicate=dp, dp_shard=1, micro_batch=mbs,
                            microbatches=B // (dp * mbs), pp_schedule="interleaved_1f1b" if v > 1 else "1f1b",
                            sp=False, ac="full", dtype="bf16", seq_len=SEQ)
            assert layout.global_batch == B and layout.gpus == n, r
            rows.append(Row(float(r["params_billion"]), gpt_config(h, l, a), layout,
                            float(r["achieved_tflops_per_gpu"]), float(r["flops_per_iter_eq3_derived"])))
    return rows


def compare(cluster: ClusterProfile | None = None) -> list[tuple[Row, Prediction]]:
    cluster = cluster or load_cluster("a100-80gb")
    stack = megatron_sc21()
    return [(row, predict(row.model, row.layout, cluster, stack)) for row in load_rows()]


def format_table(results: list[tuple[Row, Prediction]]) -> str:
    lines = ["| params | layout (t, p, v, d, mbs x m) | GPUs | published TFLOP/s | predicted | error | MFU | fits |",
             "|---:|---|---:|---:|---:|---:|---:|---|"]
    errs = []
    for row, pred in results:
        lay = row.layout
        err = pred.hardware_tflops_per_gpu / row.published_tflops - 1
        errs.append(abs(err))
        lines.append(f"| {row.params_billion:g}B | {lay.tp}, {lay.pp}, {lay.pp_virtual_stages}, {lay.dp}, "
                     f"{lay.micro_batch} x {lay.microbatches} | {lay.gpus} | {row.published_tflops:.0f} | "
                     f"{pred.hardware_tflops_per_gpu:.1f} | {err:+.1%} | {pred.mfu:.1%} | "
                     f"{'yes' if pred.fits else 'NO'} ({pred.memory.total / 1024 ** 3:.0f} GiB) |")
    lines.append(f"\nmedian |error| {statistics.median(errs):.1%}, max |error| {max(errs):.1%}")
    return "\n".join(lines)


# Table 2 models (the paper's 175B and 530B shapes); the 530B one is Table 1's row.
_TABLE2_SHAPES = {174.6: (12288, 96, 96), 529.6: (20480, 105, 128)}


def compare_table2(cluster: ClusterProfile | None = None) -> list[tuple[dict, Prediction]]:
    """Table 2 (PTD-P vs ZeRO-3) rows with predictions; informational, not an acceptance check.
    ZeRO-3 rows are modelled as FSDP over all GPUs; PTD rows as TP 8 in a node, PP over the rest."""
    cluster = cluster or load_cluster("a100-80gb")
    out = []
    with open(table1_path().with_name("megatron_table2.csv")) as f:
        for r in csv.DictReader(f):
            P, n, B = float(r["params_billion"]), int(r["num_gpus"]), int(r["global_batch_size"])
            cfg, mbs, mp = gpt_config(*_TABLE2_SHAPES[P]), int(r["microbatch_size"]), int(r["model_parallel_size"])
            if mp == 1:
                lay = Layout(dp_shard=n, micro_batch=mbs, microbatches=B // (n * mbs), ac="full", seq_len=SEQ)
                stack = deepspeed_zero3_sc21()
            else:
                dp = n // mp
                lay = Layout(tp=8, pp=mp // 8, dp_replicate=dp, micro_batch=mbs, microbatches=B // (dp * mbs),
                             ac="full", seq_len=SEQ)
                stack = megatron_sc21()
            out.append((r, predict(cfg, lay, cluster, stack)))
    return out


def format_table2(results: list[tuple[dict, Prediction]]) -> str:
    lines = ["| scheme | params | GPUs | mbs | published TFLOP/s | predicted | error | fits |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r, pred in results:
        pub = float(r["achieved_tflops_per_gpu"])
        lines.append(f"| {r['scheme']} | {float(r['params_billion']):g}B | {r['num_gpus']} | {r['microbatch_size']} | "
                     f"{pub:.0f} | {pred.hardware_tflops_per_gpu:.1f} | {pred.hardware_tflops_per_gpu / pub - 1:+.0%} | "
                     f"{'yes' if pred.fits else 'no'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys
    print(format_table2(compare_table2()) if "--table2" in sys.argv else format_table(compare()))
