"""The evaluation report's pictures in docs/: `retinanet eval --report` on a finished run (the demo's by default),
opened in headless Chromium (Debian's `chromium`, driven by playwright), the page's top (metrics and the error
chart) and its gallery saved as PNG.

    python benchmarks/report_screenshots.py [--run runs/demo] [--output docs]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CHROMIUM_ARGS, chromium  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/demo"))
    parser.add_argument("--output", type=Path, default=Path("docs"))
    args = parser.parse_args()
    executable = chromium()
    if executable is None:
        sys.exit("needs Chromium (Debian: apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    folder = args.run / "eval_report"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "retinanet.cli",
            "eval",
            "--checkpoint",
            str(args.run / "last.pt"),
            "--output",
            str(folder),
            "--report",
        ],
        check=True,
    )
    args.output.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto((folder / "report" / "index.html").resolve().as_uri())
        page.wait_for_selector("#gallery .card svg")
        page.screenshot(path=str(args.output / "report.png"))
        page.locator("#gallery").screenshot(path=str(args.output / "report_gallery.png"))
        browser.close()
    print(f"wrote {args.output / 'report.png'} and {args.output / 'report_gallery.png'}")


if __name__ == "__main__":
    main()
