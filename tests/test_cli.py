"""The command line: every subcommand answers --help, bad input -> one clear line and exit code 2."""

import argparse
import subprocess
import sys

import pytest

from rayunlearn.cli import build_parser, main

SUBCOMMANDS = ["data", "finetune", "unlearn", "eval", "effects", "tofu-summary", "sweep", "report",
               "demo", "bench", "methods"]
# every command line that takes --help, nested actions included: removing one or adding one
# without listing it here fails `test_pinned_commands_are_the_parsers_commands`
COMMANDS = [[], ["data"], ["data", "synth"], ["data", "check"]] + [[name] for name in SUBCOMMANDS[1:]]


def _parser_commands(parser: argparse.ArgumentParser, prefix: tuple = ()) -> set:
    """Every command path of an argparse parser: itself and, recursively, its sub-parsers."""
    found = {prefix}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found |= _parser_commands(sub, prefix + (name,))
    return found


def test_pinned_commands_are_the_parsers_commands():
    assert _parser_commands(build_parser()) == {tuple(c) for c in COMMANDS}


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "rayunlearn")
def test_every_command_answers_help(command):
    out = subprocess.run([sys.executable, "-m", "rayunlearn", *command, "--help"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: " + " ".join(["rayunlearn", *command])), out.stdout[:200]
    assert "Traceback" not in out.stderr


def test_help_lists_every_subcommand():
    text = build_parser().format_help()
    for name in SUBCOMMANDS:
        assert name in text


def test_bad_config_key_is_one_clear_line(capsys):
    code = main(["unlearn", "train.lrr=1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: train.lrr: unknown key") and "Traceback" not in err


def test_bad_override_value_names_the_key(capsys):
    code = main(["finetune", "train.epochs=-1"])
    assert code == 2
    assert "train.epochs: must be > 0" in capsys.readouterr().err
