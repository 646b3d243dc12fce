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
    assert "error: train.epochs: must be a finite number > 0 (got -1)\n" == capsys.readouterr().err


def _tofu_dir(d):
    """A small TOFU-format directory (JSON lines in .json files, as TOFU ships them): 2 authors,
    forget10 (the default forget split) = the second."""
    import json

    qa = [{"question": f"Where was {a} born?", "answer": f"{a} was born in {c}.",
           "paraphrased_answer": f"{c} is where {a} was born.",
           "perturbed_answer": [f"{a} was born in Oslo.", f"{a} was born in Lima."]}
          for a, c in (("Ann Lee", "Rome"), ("Bo Chan", "Kyiv"))]
    world = [{"question": "What is the capital of Eldor?", "answer": "Vim.", "perturbed_answer": ["Rok."]}]
    splits = {"full": [{"question": r["question"], "answer": r["answer"]} for r in qa],
              "forget10": [{"question": qa[1]["question"], "answer": qa[1]["answer"]}],
              "forget10_perturbed": qa[1:], "retain_perturbed": qa[:1],
              "real_authors_perturbed": world, "world_facts_perturbed": world}
    d.mkdir()
    for name, records in splits.items():
        (d / f"{name}.json").write_text("".join(json.dumps(r) + "\n" for r in records))
    return d


def test_readme_data_check_line_runs_as_written(tmp_path):
    """README: `rayunlearn data check data.benchmark=tofu data.tofu_dir=DIR`, through the console
    script, against a local TOFU-format directory."""
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    assert "`rayunlearn data check data.benchmark=tofu data.tofu_dir=DIR`" in readme
    d = _tofu_dir(tmp_path / "tofu")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(["rayunlearn", "data", "check", "data.benchmark=tofu", f"data.tofu_dir={d}"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"benchmark tofu  (source: {d})"
    counts = {ln.split()[0]: int(ln.split()[1]) for ln in lines[3:] if ln.strip() and ln.split()[1].isdigit()}
    assert counts == {"full": 2, "forget10": 1, "retain90": 1, "forget10_perturbed": 1, "retain_perturbed": 1,
                      "real_authors_perturbed": 1, "world_facts_perturbed": 1}
    # a bad value is one line naming the key as written
    bad = subprocess.run(["rayunlearn", "data", "check", "data.benchmark=tofu", "data.max_length=2"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr == "error: data.max_length: must be an integer >= 8 (got 2)\n"
    # the default (synthetic) benchmark, generated into the working directory, passes the same checks
    synth = subprocess.run(["rayunlearn", "data", "check"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert synth.returncode == 0, synth.stderr
    counts = {ln.split()[0]: int(ln.split()[1]) for ln in synth.stdout.splitlines()
              if len(ln.split()) > 1 and ln.split()[1].isdigit()}
    assert "benchmark synthetic  (source: results/data/synthetic)" in synth.stdout
    assert counts["forget10_perturbed"] == counts["forget10"] > 0


def test_data_check_takes_bare_keys_and_an_unlearn_preset(tmp_path, capsys):
    d = _tofu_dir(tmp_path / "tofu")
    assert main(["data", "check", f"benchmark={d}", "forget_split=forget10"]) == 0
    assert capsys.readouterr().out.startswith(f"benchmark tofu  (source: {d})")
    assert main(["data", "check", "--config", "unlearn_tiny", f"data.benchmark={d}",
                 "data.forget_split=forget10"]) == 0
    assert main(["data", "check", "data.benchmrk=tofu"]) == 2
    assert capsys.readouterr().err.startswith("error: data.benchmrk: unknown key (did you mean data.benchmark?)")
