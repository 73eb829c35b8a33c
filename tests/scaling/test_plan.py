import pytest

from scaling.plan import accounting, override_args, plan_sweep, step_dir_name
from scaling.spec import SweepSpecError, load_spec

from .helpers import write_spec


def test_isoflop_plan_with_cooldown_branches(tmp_path):
    spec = load_spec(write_spec(tmp_path))
    runs = plan_sweep(spec)
    kinds = [r.kind for r in runs]
    assert kinds.count("base") == 4 and kinds.count("branch") == 12 and kinds.count("scratch") == 12
    assert len({r.run_id for r in runs}) == len(runs)
    by_id = {r.run_id: r for r in runs}
    tps = 8 * 64
    for r in runs:
        if r.kind == "base":
            continue
        assert r.D == r.steps_planned * tps
        assert r.C == pytest.approx(r.budget, rel=0.1)          # D = C / 6N up to whole steps
        assert r.C == 6 * r.n_params * r.D
    for b in (r for r in runs if r.kind == "branch"):
        base = by_id[b.parent]
        k = b.overrides["optim.decay_steps"]
        assert k == max(1, round(0.2 * b.steps_planned))
        assert b.steps_planned - k in base.checkpoint_steps
        assert b.overrides["checkpoint.init_from"].endswith(f"checkpoints/{step_dir_name(b.steps_planned - k)}")
        assert b.overrides["optim.schedule"] == "wsd" and b.stage == 1 and b.is_branch
        assert b.compute_spent == 6 * b.n_params * k * tps
    for base in (r for r in runs if r.kind == "base"):
        assert base.overrides["optim.schedule"] == "constant"
        assert base.steps_planned == max(base.checkpoint_steps)
    acc = accounting(runs)
    branch_cost = sum(r.compute_spent for r in runs if r.kind in ("base", "branch"))
    scratch = sum(r.C for r in runs if r.kind == "branch")
    assert acc["saved_fraction"] == pytest.approx(1 - branch_cost / scratch)
    assert 0.2 < acc["saved_fraction"] < 0.6


def test_grid_design_lr_grid_and_scaled_rule(tmp_path):
    spec = load_spec(write_spec(tmp_path, replace={
        'kind = "isoflop"\nbudgets = [6e9, 1.2e10, 2.4e10]': 'kind = "grid"\ntokens = [20000, 40000]',
        'rule = "fixed"': 'rule = "scaled"\nref_dim = 32\nexponent = -1.0',
        "grid = [1.0]": "grid = [0.5, 1.0, 2.0]",
        "enabled = true": "enabled = false"}))
    runs = plan_sweep(spec)
    assert len(runs) == 4 * 2 * 3 and {r.kind for r in runs} == {"scratch"}
    lrs = sorted({r.lr for r in runs if r.dim == 64})
    assert lrs == pytest.approx([0.00075, 0.0015, 0.003])           # 3e-3 * 32/64 * {0.5, 1, 2}
    assert all(r.overrides["optim.schedule"] == "cosine" for r in runs)


def test_override_args_format():
    assert override_args({"a.b": 3, "c.d": [1, 2], "e.f": True, "g.h": "x"}) == \
        ["--a.b", "3", "--c.d", "[1, 2]", "--e.f", "true", "--g.h", "x"]


def test_step_dir_name_matches_the_trainer():
    checkpoint = pytest.importorskip("trainer.checkpoint")
    assert step_dir_name(123) == checkpoint.step_dir_name(123)


@pytest.mark.parametrize("old,new,match", [
    ("head_dim = 16", "head_dim = 20", "not a multiple of head_dim"),
    ("fraction = 0.2", "fraction = 1.5", r"fraction = 1.5: must be in \(0, 1\)"),
    ('kind = "isoflop"', 'kind = "isoflops"', "expected one of"),
    ("warmup_steps = 3", "warmup_steps = 30", "not more than warmup_steps=30"),
    ("[batch]", "[batch]\nbatch = 3", r"\[batch\] has unknown keys \['batch'\]"),
    ("batch_size = 8", 'batch_size = { "32" = 8 }', "lacks dims"),
])
def test_bad_specs_name_the_field(tmp_path, old, new, match):
    with pytest.raises(SweepSpecError, match=match):
        plan_sweep(load_spec(write_spec(tmp_path, replace={old: new})))
