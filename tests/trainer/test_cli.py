import subprocess
import sys

from trainer.cli import main


def test_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("train", "generate", "prepare", "plan", "sweep", "export", "slurm"):
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
