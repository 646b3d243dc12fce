"""The command line: subcommands listed, bad input -> one clear line and exit code 2."""

import subprocess
import sys

from rayunlearn.cli import build_parser, main

SUBCOMMANDS = ["data", "finetune", "unlearn", "eval", "effects", "tofu-summary", "sweep", "report",
               "demo", "bench", "methods"]


def test_help_lists_every_subcommand():
    text = build_parser().format_help()
    for name in SUBCOMMANDS:
        assert name in text


def test_console_script_runs_help():
    out = subprocess.run([sys.executable, "-m", "rayunlearn", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "tofu-summary" in out.stdout and "sweep" in out.stdout


def test_bad_config_key_is_one_clear_line(capsys):
    code = main(["unlearn", "train.lrr=1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: train.lrr: unknown key") and "Traceback" not in err


def test_bad_override_value_names_the_key(capsys):
    code = main(["finetune", "train.epochs=-1"])
    assert code == 2
    assert "train.epochs: must be > 0" in capsys.readouterr().err
