"""Command-line usage errors (unknown option or command, missing or malformed value) are one
``forgetless: error:`` line on stderr and exit code 2, for every sub-command, as bad input is
everywhere else; help still prints in full. Runs ``cli.main`` in this process (a subprocess
costs seconds of imports)."""

from __future__ import annotations

import pytest

SUBCOMMANDS = ["train", "eval", "continual", "check", "compare", "plan", "tune"]


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("forgetless: error: ")
    return lines[0]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_unknown_option_is_one_line(command, cli):
    code, out, err = cli(command, "x.yaml", "--bogus", "1")
    line = _one_error_line(err)
    assert code == 2 and "--bogus" in line and f"forgetless {command} --help" in line
    assert out == ""


@pytest.mark.parametrize("argv, words", [
    (["compare", "x.yaml", "--nope"], "--nope"),
    (["nosuchcommand"], "nosuchcommand"),
    (["check"], "--model"),  # a required option missing
    (["plan", "--model", "m", "--batch-size", "many"], "--batch-size"),  # not an integer
    (["--bogus", "train"], "--bogus"),
])
def test_other_usage_errors_are_one_line(argv, words, cli):
    code, _, err = cli(*argv)
    line = _one_error_line(err)
    assert code == 2 and words in line and line.endswith("--help)")


def test_help_still_prints(cli):
    code, out, err = cli("train", "--help")
    assert code == 0 and "Usage" in out and err == ""
    code, out, _ = cli()  # no command: the overview
    assert "train" in out and "compare" in out
