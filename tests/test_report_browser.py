"""The HTML report read in a real browser: headless Chromium, a 1400-px window, a report the
size of configs/breadth.yaml's (six methods, four held-out tasks, two measures, target NLL, two
seeds). Its tables must fit the window (no sideways scrolling). Skipped without Chromium
(``apt-get install chromium``); ``scripts/report_screenshot.py`` takes the docs' screenshot the
same way."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_report import _metric, _with_continuous, fake_results

WINDOW = 1400
BROWSER = next((shutil.which(name) for name in ("chromium", "chromium-browser",
                                                "google-chrome") if shutil.which(name)), None)
needs_browser = pytest.mark.skipif(BROWSER is None, reason="no Chromium installed")
sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))

SUITE = ["humaneval", "xcopa", "arc_easy", "piqa"]


def breadth_results() -> dict:
    """fake_results grown to breadth.yaml's shape."""
    results = fake_results()
    results["suite"] = SUITE
    results["sample_sizes"] = {"humaneval": 12, "xcopa": 132, "arc_easy": 60, "piqa": 60,
                               "largest_number": 20, "drift_prompts": 32}
    results["target"] = "largest_number"
    attn = results["methods"][1]
    for name in ("mlp-gate-up", "mofo", "lora", "lwf"):
        results["methods"].append({**copy.deepcopy(attn), "name": name, "method": name})
    for item in [results["base"], *results["methods"],
                 *[p for e in results["methods"] for p in e["interpolation"]]]:
        item["heldout"] = {task: copy.deepcopy(item["heldout"]["arc_easy"]) for task in SUITE}
        item["heldout"]["humaneval"]["score"] = "pass@1"  # a code task: lm-eval's name
        if item is not results["base"]:
            item["target"]["nll_delta"] = _metric(-0.512, 0.101)
    _with_continuous(results, "gold_logprob")
    for entry in results["methods"]:
        entry["seeds"] = [{"seed": s, **copy.deepcopy({k: entry[k] for k in (
            "heldout", "heldout_avg", "target", "drift")}), "train": {"train_seconds": 100.0}}
            for s in (0, 1)]
    return results


def _measure(page: Path) -> dict:
    """Load ``page`` in headless Chromium at WINDOW px and read back how wide it laid out."""
    probe = page.with_name("probe.html")
    script = ("<script>const r = [...document.querySelectorAll('table')].map("
              "t => Math.ceil(t.getBoundingClientRect().right));"
              "document.body.setAttribute('data-fit', JSON.stringify({inner: innerWidth, "
              "scroll: document.documentElement.scrollWidth, tables: r}));</script>")
    probe.write_text(page.read_text().replace("</body>", script + "</body>"))
    done = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu",
                           f"--window-size={WINDOW},1000", "--dump-dom", probe.as_uri()],
                          capture_output=True, text=True, timeout=120)
    marker = "data-fit=\""
    dom = done.stdout
    assert marker in dom, done.stderr[-2000:]
    raw = dom.split(marker, 1)[1].split('"', 1)[0]
    return json.loads(raw.replace("&quot;", '"'))


@needs_browser
def test_report_tables_fit_a_1400_px_window(tmp_path):
    from forgetless.report import write_report

    page = write_report(breadth_results(), tmp_path)["html"]
    fit = _measure(page)
    assert fit["inner"] == WINDOW and len(fit["tables"]) >= 3
    assert max(fit["tables"]) <= WINDOW, fit
    assert fit["scroll"] <= WINDOW, fit


@needs_browser
def test_the_browser_check_can_fail(tmp_path):
    """A row of unbreakable 20-character cells (as before the CI moved under the value) is
    measured wider than the window: the check above is not vacuous."""
    page = tmp_path / "wide.html"
    cells = "".join(f"<td style='white-space:nowrap'>-0.080* [-0.090, -0.070] #{i}</td>"
                    for i in range(12))
    page.write_text(f"<html><body><table><tr>{cells}</tr></table></body></html>")
    fit = _measure(page)
    assert fit["scroll"] > WINDOW and max(fit["tables"]) > WINDOW
