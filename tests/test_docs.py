"""Docs speak to users on any machine: no absolute paths of the machine they were written on
(a command a reader copies must not write into someone else's home or /work)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOCS = sorted([ROOT / "README.md", ROOT / "ARCHITECTURE.md", *(ROOT / "docs").glob("*.md")])
# An absolute path into a machine's own folders: /work/..., /root/..., /home/..., /tmp/...,
# /Users/... (not inside a URL or a relative path: "github.com/home/..." or "runs/tmp/...").
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(work|root|home|tmp|Users|mnt|scratch)/")


def machine_paths(text: str) -> list[str]:
    """``line: text`` of every line holding a machine-specific absolute path."""
    return [f"{number}: {line.strip()}" for number, line in enumerate(text.splitlines(), 1)
            if MACHINE_PATH.search(line)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_machine_specific_paths(doc):
    assert machine_paths(doc.read_text(encoding="utf-8")) == []


def test_the_check_finds_them():
    found = machine_paths("run\n  forgetless compare x.yaml output_dir=/work/exp/a\n"
                          "MLFLOW_TRACKING_URI=sqlite:////tmp/m.db\nsee /root/x and /home/u/y\n"
                          "fine: runs/tmp/x, https://github.com/home/x, ~/work/x, docs/img/a\n")
    assert [line.split(":")[0] for line in found] == ["2", "3", "4"]
