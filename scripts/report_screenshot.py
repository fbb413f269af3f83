"""Screenshot a compare report as a reader sees it: headless Chromium, a 1400-px window.

    python scripts/report_screenshot.py runs/demo/report.html docs/img/report/demo-report.png

The same browser and window ``tests/test_report_browser.py`` checks the table width in. Prints
how wide the page laid out (``scroll``) and where each table ends, so a too-wide table shows.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

WINDOW = 1400


def browser() -> str:
    found = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                  if shutil.which(n)), None)
    if found is None:
        sys.exit("report_screenshot: no Chromium found (apt-get install chromium)")
    return found


def run(page: Path, *flags: str, height: int) -> str:
    return subprocess.run([browser(), "--headless", "--no-sandbox", "--disable-gpu",
                           "--hide-scrollbars", f"--window-size={WINDOW},{height}", *flags,
                           page.as_uri()], capture_output=True, text=True, timeout=120).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="report.html of a compare")
    parser.add_argument("png", type=Path, help="where the screenshot goes")
    parser.add_argument("--height", type=int, default=1300, help="window height (px)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        probe = Path(folder) / "probe.html"
        script = ("<script>document.body.setAttribute('data-fit', JSON.stringify({"
                  "scroll: document.documentElement.scrollWidth, tables: [...document."
                  "querySelectorAll('table')].map(t => Math.ceil(t.getBoundingClientRect()"
                  ".right))}));</script>")
        probe.write_text(args.report.read_text().replace("</body>", script + "</body>"))
        dom = run(probe, "--dump-dom", height=args.height)
        fit = json.loads(dom.split('data-fit="', 1)[1].split('"', 1)[0].replace("&quot;", '"'))
    args.png.parent.mkdir(parents=True, exist_ok=True)
    run(args.report.resolve(), f"--screenshot={args.png.resolve()}", height=args.height)
    print(f"window {WINDOW} px: page {fit['scroll']} px wide, tables end at {fit['tables']}; "
          f"wrote {args.png}")


if __name__ == "__main__":
    main()
