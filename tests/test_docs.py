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


def _slugs(text: str) -> set[str]:
    """Heading anchors as GitHub makes them (lowercase; punctuation dropped; spaces -> '-'),
    skipping '#' lines inside code blocks."""
    slugs, fenced = set(), False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            title = line.lstrip("#").strip().lower()
            slugs.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return slugs


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_within_a_page_reach_a_heading(doc):
    text = doc.read_text(encoding="utf-8")
    missing = set(re.findall(r"\]\(#([^)]+)\)", text)) - _slugs(text)
    assert not missing, missing


def test_results_open_with_a_summary():
    """docs/results.md is long: its first section is the one-page summary linking the rest."""
    text = (ROOT / "docs" / "results.md").read_text(encoding="utf-8")
    sections = [line for line in text.splitlines() if line.startswith("## ")]
    assert sections[0] == "## Summary"
    summary = text.split("## Summary", 1)[1].split("\n## ", 1)[0]
    assert len(summary.splitlines()) <= 60 and summary.count("](#") >= 6
