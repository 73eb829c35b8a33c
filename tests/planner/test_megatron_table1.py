"""Validation against Narayanan et al. (SC'21) Table 1 on the a100-80gb profile, one set of constants."""
import statistics

import pytest

from parallel.planner.cluster import load_cluster
from parallel.planner.layout import megatron_sc21
from parallel.planner.megatron import compare, compare_table2, format_table, format_table2, load_rows
from parallel.planner.predict import predict, recompute_flops_per_token
from parallel.planner.search import search


@pytest.fixture(scope="module")
def results():
    return compare(load_cluster("a100-80gb"))


def test_flop_convention_matches_the_paper():
    """Their eq. (3) = ModelConfig's 3-pass FLOPs + the recomputed forward of the layers."""
    for row in load_rows():
        lay = row.layout
        ours = lay.global_batch * lay.seq_len * (row.model.flops_per_token(lay.seq_len)
                                                 + recompute_flops_per_token(row.model, lay))
        assert ours == pytest.approx(row.flops_per_iter, rel=1e-5), row.params_billion
        assert row.model.num_params() / 1e9 == pytest.approx(row.params_billion, rel=0.03)


def test_predicted_tflops_within_10pct_median_20pct_all(results):
    print("\n" + format_table(results))
    errors = [abs(pred.hardware_tflops_per_gpu / row.published_tflops - 1) for row, pred in results]
    assert len(errors) == 10
    assert statistics.median(errors) <= 0.10, errors
    assert max(errors) <= 0.20, errors


def test_published_layouts_fit(results):
    """The runs happened, so the memory model must not call them impossible."""
    for row, pred in results:
        assert pred.fits, (row.params_billion, pred.memory)


@pytest.mark.slow
def test_planner_matches_or_beats_each_published_layout():
    cluster, stack = load_cluster("a100-80gb"), megatron_sc21()
    for row in load_rows():
        lay = row.layout
        published = predict(row.model, lay, cluster, stack)
        best = search(row.model, cluster, lay.gpus, lay.global_batch, lay.seq_len, "bf16", stack).ranked[0]
        assert best.fits and best.layout.gpus == lay.gpus and best.layout.global_batch == lay.global_batch
        print(f"{row.params_billion:g}B: published {lay.short()} {published.tokens_per_s:,.0f} tok/s -> "
              f"planner {best.layout.short()} {best.tokens_per_s:,.0f} tok/s")
        assert best.tokens_per_s >= published.tokens_per_s, row.params_billion


@pytest.fixture(scope="module")
def table2():
    results = compare_table2(load_cluster("a100-80gb"))
    print("\n" + format_table2(results))
    return results


def test_table2_ptd_rows_within_10pct(table2):
    """Same constants, other layouts (Table 2's PTD-P rows)."""
    results = table2
    ptd = [(r, p) for r, p in results if r["scheme"].startswith("PTD")]
    assert len(ptd) == 6
    for r, pred in ptd:
        assert abs(pred.hardware_tflops_per_gpu / float(r["achieved_tflops_per_gpu"]) - 1) <= 0.10, r


def test_table2_zero3_rows_fall_with_gpu_count_as_published(table2):
    """ZeRO-3 at a fixed global batch: each rank gathers and reduces the whole model whatever the GPU
    count, while its compute shrinks with its batch, and each of the thousands of per-tensor
    collectives pays a ring latency that grows with the ranks. So per-GPU throughput must fall with
    the GPU count, as the paper's does (175B: 144 -> 88 -> 44; 530B: 138 -> 98 -> 48).

    Bounds, per row 0.8 <= predicted / published <= 2:
    - 0.8 is Table 1's per-row bound: the compute terms are Table 1's, and the communication terms
      only add time, so an under-prediction beyond it would mean the latency term is too large;
    - 2 says the modelled compute and communication account for at least half of each measured step.
      The model omits costs that only slow DeepSpeed down (per-module hooks, synchronisation,
      stragglers), so the error is one-sided; before the latency model rows reached 2.8x.
    And from the fewest to the most GPUs (4x as many) the per-GPU figure must fall at least 2x: the
    per-rank communication volume is fixed while compute per rank is quartered, so a fall under 2x
    would mean communication is not yet the larger part of the largest run, which the paper's
    2.9-3.3x falls contradict (the model without these terms fell 1.5x)."""
    zero3 = [(r, p) for r, p in table2 if r["scheme"].startswith("ZeRO-3")]
    assert len(zero3) == 6
    for size in {r["params_billion"] for r, _ in zero3}:
        rows = sorted(((int(r["num_gpus"]), float(r["achieved_tflops_per_gpu"]), p.hardware_tflops_per_gpu)
                       for r, p in zero3 if r["params_billion"] == size))
        predicted = [pred for _, _, pred in rows]
        assert all(a > b for a, b in zip(predicted, predicted[1:])), (size, rows)
        assert predicted[0] / predicted[-1] >= 2, (size, rows)
        for gpus, published, pred in rows:
            assert 0.8 <= pred / published <= 2, (size, gpus, published, pred)
