"""Screenshot of a report's per-head view: python docs/screenshot.py REPORT_DIR [HEAD] [OUT_PNG].

Opens REPORT_DIR/report.html#head=HEAD in headless Chromium (driven over the DevTools pipe by the same
harness as tests/test_report.py), waits until the head's CircuitsVis pattern has rendered, and captures
the view.
"""

import base64
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_report import Chromium  # noqa: E402


def main(report_dir: str, head: str = "L9H8", out: str = "docs/head_view.png") -> None:
    browser = Chromium()
    try:
        browser.open(Path(report_dir) / "report.html")
        browser.wait_for("document.querySelector('#head-pattern canvas') !== null", timeout=180)
        browser.eval(f"window.headlensShowHead({head!r}, true)")
        browser.wait_for(
            f"document.getElementById('head-title').textContent.startsWith({head + ':'!r}) "
            "&& document.querySelector('#head-pattern canvas') !== null",
            timeout=180,
        )
        browser.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": 1150, "deviceScaleFactor": 1, "mobile": False},
        )
        browser.eval("document.getElementById('head').scrollIntoView()")
        time.sleep(1.5)
        Path(out).write_bytes(base64.b64decode(browser.send("Page.captureScreenshot", {"format": "png"})["data"]))
    finally:
        browser.close()
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
