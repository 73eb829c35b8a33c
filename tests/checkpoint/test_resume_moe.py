"""A MoE run with the aux-loss-free expert bias, stopped and resumed in one process, is the
uninterrupted run: losses, gradient norms and routing loads step for step, and the expert biases
(checkpointed buffers that move after every step) end bit for bit the same."""
from tests.checkpoint.helpers import config, losses, run
from trainer import checkpoint_files as files
from trainer.checkpoint import load_model_weights
from trainer.model import Transformer

# bias_rate 1e-2: after 3 steps the biases are +-0.03, far above the spread of the softmax scores
# of a freshly initialised router (logits ~0.02 x sqrt(dim)): without them restored, step 4 routes
# differently and its loss differs.
MOE = ["--model.moe_experts", "4", "--model.moe_top_k", "2", "--model.moe_hidden", "16",
       "--model.moe_bias_rate", "1e-2", "--train.steps", "6"]


def per_step(rows, key):
    return {r["step"]: r[key] for r in rows if key in r}


def final_biases(run_dir):
    model = Transformer(config(run_dir, *MOE).model)
    load_model_weights(model, files.complete_checkpoints(run_dir / "checkpoints")[-1])
    return {k: v for k, v in model.state_dict().items() if k.endswith("expert_bias")}


def test_moe_resume_matches_uninterrupted_run(tmp_path, capsys):
    ref, d = tmp_path / "ref", tmp_path / "run"
    _, want = run(ref, *MOE)
    summary, _ = run(d, *MOE, signal_at=3)
    assert summary["preempted"] and summary["steps"] == 3
    stopped = final_biases(d)
    assert len(stopped) == 2 and all(b.abs().max() > 0 for b in stopped.values())     # the biases moved and were saved
    capsys.readouterr()
    summary, got = run(d, *MOE)
    assert "resumed from" in capsys.readouterr().out and summary["steps"] == 6
    assert losses(got) == losses(want) and sorted(losses(got)) == list(range(1, 7))   # exact: fp32, same batches
    for key in ("grad_norm", "moe_load_max_mean", "moe_aux_loss"):
        assert per_step(got, key) == per_step(want, key) and len(per_step(want, key)) == 6, key
    ends, theirs = final_biases(d), final_biases(ref)
    assert ends.keys() == theirs.keys() and len(ends) == 2
    assert all(ends[k].equal(theirs[k]) for k in ends) and any(not ends[k].equal(stopped[k]) for k in ends)
