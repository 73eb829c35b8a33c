import subprocess
import sys

from trainer.cli import main


def test_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("train", "generate", "prepare", "plan", "sweep", "export", "slurm", "doctor"):
        assert f"  {name} " in out


def test_unknown_command_and_config_errors_exit_2(capsys):
    assert main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err
    assert main(["train", "--config", "configs/tiny.toml", "--optim.lrr", "1"]) == 2
    assert "config error: unknown key optim.lrr, did you mean 'lr'?" in capsys.readouterr().err


def test_python_dash_m_trainer_with_only_overrides_means_train():
    r = subprocess.run([sys.executable, "-m", "trainer", "--config", "configs/tiny.toml", "--train.stepz", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "meshformer train: config error: unknown key train.stepz" in r.stderr


def test_help_of_every_config_command_lists_every_key_with_type_default_and_help(capsys):
    from core.config_parse import field_types
    from core.run_config import SECTIONS
    for command in (["train"], ["generate"], ["slurm"], ["plan"], ["plan", "predict"]):
        try:
            main([*command, "--help"])
        except SystemExit as e:          # argparse exits 0 after printing help
            assert e.code == 0
        out = " ".join(capsys.readouterr().out.split())     # help text is wrapped: compare without line breaks
        for section, cls in SECTIONS.items():
            for key, (f, _) in field_types(cls).items():
                assert f"--{section}.{key} (" in out, (command, section, key)
                assert " ".join(f.metadata["help"].split()) in out, (command, section, key)
    assert '--optim.lr (float, default 0.003)' in out and "--model.activation ('swiglu' | 'gelu', default \"swiglu\")" in out


def test_bad_input_errors_are_one_line_for_every_subcommand(capsys, tmp_path):
    assert main(["slurm", "--config", "configs/tiny.toml", "--dry-run", "--nodes", "3", "--parallel.dp_replicate", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("meshformer slurm: config error: parallel:") and err.count("\n") == 1
    assert main(["train", "--config", "configs/tiny.toml", "--data.urls", str(tmp_path / "none.tar"),
                 "--run.dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("meshformer train: data error:") and "none.tar" in err and "Traceback" not in err
