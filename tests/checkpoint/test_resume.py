"""Stop and resume in one process: exact losses, signals, keep-last-k, init_from, async."""
import json
import shutil

import pytest

from tests.checkpoint.helpers import config, factory, forge_checksums, losses, lrs, run
from trainer import checkpoint_files as files
from trainer.checkpoint import PREEMPTED_MARKER, CheckpointManager
from trainer.checkpoint_state import CheckpointError
from launch.preemption import EXIT_PREEMPTED
from trainer.train import train

STEPS = ["--train.steps", "8"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref") / "run"
    summary, rows = run(d, *STEPS, "--checkpoint.at_steps", "[4]")
    return d, losses(rows)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_signal_saves_exits_and_resume_matches_uninterrupted_run(tmp_path, reference, mode, capsys):
    _, want = reference
    d = tmp_path / "run"
    extra = [*STEPS, "--checkpoint.async", str(mode == "async").lower()]
    summary, rows = run(d, *extra, signal_at=3)
    assert summary["preempted"] and summary["steps"] == 3
    assert [p.name for p in files.complete_checkpoints(d / "checkpoints")] == ["step-00000003"]
    marker = json.loads((d / PREEMPTED_MARKER).read_text())
    assert marker["step"] == 3 and marker["exit_code"] == EXIT_PREEMPTED and marker["signal"] == "SIGUSR1"
    capsys.readouterr()

    summary, rows = run(d, *extra)
    assert f"resumed from {d / 'checkpoints' / 'step-00000003'} at step 3" in capsys.readouterr().out
    assert not summary["preempted"] and summary["steps"] == 8
    assert not (d / PREEMPTED_MARKER).exists()
    got = losses(rows)
    assert sorted(got) == list(range(1, 9))          # metrics.jsonl continues: 1-3, then 4-8
    assert got == want                                # exact: fp32, same batches, same RNG


def test_sigterm_is_handled_too(tmp_path):
    import signal
    summary, _ = run(tmp_path / "r", *STEPS, signal_at=2, sig=signal.SIGTERM)
    assert summary["preempted"] and summary["steps"] == 2


def test_keep_last_k_keeps_at_steps_and_records_latest(tmp_path):
    d = tmp_path / "r"
    run(d, "--train.steps", "7", "--checkpoint.every", "1", "--checkpoint.keep", "2", "--checkpoint.at_steps", "[2]")
    names = [p.name for p in files.complete_checkpoints(d / "checkpoints")]
    assert names == ["step-00000002", "step-00000006", "step-00000007"]
    assert (d / "checkpoints" / "latest").read_text().strip() == "step-00000007"
    assert not files.partial_checkpoints(d / "checkpoints")


def test_keep_one_never_leaves_zero(tmp_path):
    d = tmp_path / "r"
    run(d, "--train.steps", "3", "--checkpoint.every", "1", "--checkpoint.keep", "1", "--checkpoint.async", "true")
    assert [p.name for p in files.complete_checkpoints(d / "checkpoints")] == ["step-00000003"]


def test_init_from_checkpoint_continues_step_optimizer_and_schedule(tmp_path, reference):
    src, want = reference
    d = tmp_path / "branch"
    _, rows = run(d, *STEPS, "--checkpoint.init_from", str(src / "checkpoints" / "step-00000004"))
    assert losses(rows) == {s: want[s] for s in range(5, 9)}     # same total steps: identical continuation


def test_init_from_branch_with_longer_wsd_keeps_constant_lr(tmp_path):
    base = ["--optim.schedule", "wsd", "--optim.decay_steps", "4"]
    _, rows = run(tmp_path / "a", "--train.steps", "8", *base, "--checkpoint.at_steps", "[3]")
    a = lrs(rows)
    peak = a[3]
    assert a[8] < 0.3 * peak                                           # a decayed over steps 5-8
    _, rows = run(tmp_path / "b", "--train.steps", "16", *base,
                  "--checkpoint.init_from", str(tmp_path / "a" / "checkpoints" / "step-00000003"))
    # b branches at step 3 with 16 steps: constant LR up to step 12, then its own decay
    got = lrs(rows)
    assert min(got) == 4
    assert all(got[s] == pytest.approx(peak) for s in range(4, 13)), got
    assert got[16] < 0.3 * peak


def test_init_from_run_folder_takes_its_newest_checkpoint(tmp_path, reference, capsys):
    src, want = reference
    summary, _ = run(tmp_path / "b", "--train.steps", "9", "--checkpoint.init_from", str(src))
    assert f"initialised from {src / 'checkpoints' / 'step-00000008'} at step 8" in capsys.readouterr().out
    assert summary["steps"] == 9


def test_async_save_writes_the_state_of_its_step(monkeypatch, tmp_path):
    """Training continues while the state is staged and written: the checkpoint must hold the
    weights as they were at save time, not as the next optimizer step changed them. Staging is
    slowed down so that the step certainly comes while it runs: the optimizer's pre-step hook
    must make the step wait for the copy."""
    import time

    import torch
    from trainer import checkpoint_async
    from trainer.checkpoint import load_model_weights
    from trainer.model import Transformer
    copied_at = []
    real_copy = checkpoint_async._GilFreeStateDictStager._stage_untyped_storage

    def slow_copy(self, storage, non_blocking=False):
        time.sleep(0.02)
        copied_at.append(time.monotonic())
        return real_copy(self, storage, non_blocking)

    monkeypatch.setattr(checkpoint_async._GilFreeStateDictStager, "_stage_untyped_storage", slow_copy)
    ckpt, model, opt = _manager(tmp_path / "r", "--checkpoint.async", "true")
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()                                  # optimizer state exists, as in training
    before = {k: v.clone() for k, v in model.state_dict().items()}
    saved = ckpt.save()
    returned_at = time.monotonic()
    opt.step()                                  # must wait for the copy
    assert any(t > returned_at for t in copied_at), "staging did not overlap the training thread"
    assert not torch.equal(model.state_dict()["tok_embeddings.weight"], before["tok_embeddings.weight"])
    ckpt.finish()
    fresh = Transformer(model.cfg)
    load_model_weights(fresh, saved)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, before[k]), k


def _manager(run_dir, *extra):
    import torch
    from launch.context import DistContext
    from trainer.model import Transformer
    from trainer.optim import build_optimizer, build_scheduler
    from trainer.train import TrainState
    cfg = config(run_dir, *extra)
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"))
    sched = build_scheduler(opt, cfg.optim, 10)
    loader = factory()(cfg.data, split="train", seq_len=16, batch_size=4, dp_rank=0, dp_size=1, seed=0)
    ckpt = CheckpointManager(cfg, DistContext(), run_dir, model=model, optimizer=opt, scheduler=sched,
                             loader=loader, state=TrainState(step=3))
    return ckpt, model, opt


@pytest.mark.parametrize("saved_format", [2, 1])
def test_resume_takes_optimizer_hyperparameters_from_its_config(monkeypatch, tmp_path, saved_format):
    """The checkpoint holds the optimizer's moments and step counts; its hyperparameters come
    from the resuming run's config. Format-1 checkpoints, which also held them, still load."""
    import torch
    from trainer import checkpoint_state
    from trainer.checkpoint_state import read_metadata
    d = tmp_path / "r"
    ckpt, model, opt = _manager(d, "--optim.weight_decay", "0.1", "--optim.beta2", "0.95")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    if saved_format == 1:
        monkeypatch.setattr(checkpoint_state, "HYPERPARAMETERS", "no key starts like this")
    saved = ckpt.save()
    ckpt.finish()
    monkeypatch.undo()
    keys = read_metadata(saved).state_dict_metadata.keys()
    assert any(k.startswith("optim.state.") and k.endswith(".exp_avg") for k in keys)
    assert any(k.startswith("optim.param_groups.") for k in keys) == (saved_format == 1)

    ckpt2, model2, opt2 = _manager(d, "--optim.weight_decay", "0.5", "--optim.beta2", "0.99")
    ckpt2.load(saved)
    assert [g["weight_decay"] for g in opt2.param_groups] == [0.5, 0.0]
    assert all(g["betas"][1] == 0.99 for g in opt2.param_groups)
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, p2)
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][k], opt2.state[p2][k]), k
    ckpt2.finish()


# ---- bad input ------------------------------------------------------------------------------

def test_changed_model_config_names_the_field(tmp_path, reference):
    src, _ = reference
    d = tmp_path / "r"
    shutil.copytree(src / "checkpoints", d / "checkpoints")
    with pytest.raises(CheckpointError, match=r"model\.dim: checkpoint has 32, this run has 64"):
        train(config(d, *STEPS, "--model.dim", "64"), loader_factory=factory())
    with pytest.raises(CheckpointError, match=r"model\.rope_theta"):
        train(config(d, *STEPS, "--model.rope_theta", "500000"), loader_factory=factory())


def test_shape_mismatch_is_reported_tensor_by_tensor(tmp_path, reference):
    """Even when train.json agrees, the tensors themselves are checked: no silent partial load."""
    src, _ = reference
    d = tmp_path / "r"
    shutil.copytree(src / "checkpoints", d / "checkpoints")
    meta_file = d / "checkpoints" / "step-00000008" / "train.json"
    meta = json.loads(meta_file.read_text())
    meta["model"]["n_layers"] = 3
    meta_file.write_text(json.dumps(meta))
    forge_checksums(meta_file.parent)              # a consistent checkpoint, not a damaged one
    with pytest.raises(CheckpointError, match=r"missing in the checkpoint: layers\.2\.attention\.wq\.weight"):
        train(config(d, *STEPS, "--model.n_layers", "3"), loader_factory=factory())


def test_missing_and_partial_checkpoints_are_refused(tmp_path, reference):
    src, _ = reference
    with pytest.raises(CheckpointError, match="does not exist"):
        run(tmp_path / "a", *STEPS, "--checkpoint.init_from", str(tmp_path / "nope"))
    partial = tmp_path / "partial"
    shutil.copytree(src / "checkpoints" / "step-00000004", partial)
    (partial / files.COMPLETE).unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        run(tmp_path / "b", *STEPS, "--checkpoint.init_from", str(partial))


def test_metadata_that_would_run_code_is_refused(tmp_path, reference):
    import os
    import pickle
    src, _ = reference
    bad = tmp_path / "bad"
    shutil.copytree(src / "checkpoints" / "step-00000004", bad)

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))
    (bad / ".metadata").write_bytes(pickle.dumps(Evil()))
    forge_checksums(bad)
    with pytest.raises(CheckpointError, match="refusing to load"):
        run(tmp_path / "c", *STEPS, "--checkpoint.init_from", str(bad))
    assert not (tmp_path / "pwned").exists()


def test_failed_background_write_is_raised_and_never_committed(monkeypatch, tmp_path):
    import torch
    from launch.context import DistContext
    from trainer import checkpoint_async

    def disk_full(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_async.dcp, "save", disk_full)
    committed, wrote = [], []
    writer = checkpoint_async.AsyncCheckpointWriter(DistContext())
    writer.start({"w": torch.ones(3)}, tmp_path, before_write=lambda: wrote.append(1),
                 on_done=lambda: committed.append(1))
    with pytest.raises(OSError, match="disk full"):
        writer.wait()
    assert wrote == [1] and committed == [] and not writer.pending
    writer.close()


def test_writer_skips_zip_crc_only_while_writing(tmp_path):
    """Shards are written without torch.save's per-record CRC32 (unchecked by torch.load, and
    computed with the GIL held); the process-wide option is back afterwards; the data loads."""
    import torch
    import torch.distributed.checkpoint as dcp
    from trainer.checkpoint_state import CheckpointWriter, dcp_load, single_process_quiet
    seen = []
    real = dcp.FileSystemWriter.write_data

    def spy(self, plan, planner):
        seen.append(torch.serialization.get_crc32_options())
        return real(self, plan, planner)

    sd = {"w": torch.randn(64, 64), "v": torch.arange(10.0)}
    dcp.FileSystemWriter.write_data = spy
    try:
        with single_process_quiet():
            dcp.save(sd, storage_writer=CheckpointWriter(str(tmp_path / "c")))
    finally:
        dcp.FileSystemWriter.write_data = real
    assert seen == [False] and torch.serialization.get_crc32_options() is True
    got = {"w": torch.zeros(64, 64), "v": torch.zeros(10)}
    dcp_load(got, tmp_path / "c")
    assert torch.equal(got["w"], sd["w"]) and torch.equal(got["v"], sd["v"])


def test_checkpoint_from_before_an_option_existed_resumes():
    """A checkpoint written before an option existed lacks its key: the model then behaved as the
    option's default (new options default to off), so only a real change is named."""
    from dataclasses import asdict

    from core.model_config import ModelConfig
    from trainer.checkpoint_state import model_config_diff
    current = asdict(ModelConfig(vocab_size=320))
    older = {k: v for k, v in current.items() if k not in ("doc_mask", "eot_id", "attn_window", "moe_experts")}
    assert model_config_diff(older, current) == []
    assert model_config_diff(older, {**current, "eot_id": 256}) == []          # eot_id unused without doc_mask
    assert model_config_diff(older, {**current, "doc_mask": True}) == [
        "model.doc_mask: checkpoint has False, this run has True"]
    assert model_config_diff({**older, "dim": 64}, {**current, "dim": 128}) == [
        "model.dim: checkpoint has 64, this run has 128"]
