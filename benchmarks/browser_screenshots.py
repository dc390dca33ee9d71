"""Screenshots of a built feature browser: the index and one feature page, in headless Debian Chromium.

Fails when a page logs a console error or asks for anything but a file:// URL. The feature is the first
page of the condition that is both explained and steered (else its first page)::

    python benchmarks/browser_screenshots.py results/lm/browser topk-k32-l2w0-noreg /work/scratch/browser_shots --prefix default_
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sae_pipeline.browser import CHROMIUM_ARGS



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("browser_dir", type=Path)
    parser.add_argument("variant")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--prefix", default="")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    arguments = parser.parse_args()
    from playwright.sync_api import sync_playwright

    root = arguments.browser_dir.resolve()
    pages = json.loads((root / "records" / f"{arguments.variant}.json").read_text())["pages"]
    feature = next((id_ for id_, page in pages.items() if page["steering"] and page["explanation"]), next(iter(pages)))
    arguments.out_dir.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=arguments.chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.on(
            "request", lambda request: None if request.url.startswith("file://") else problems.append(f"network: {request.url}")
        )
        page.goto(f"{(root / 'index.html').as_uri()}?v={arguments.variant}")
        page.wait_for_selector("#features tbody tr")
        page.screenshot(path=str(arguments.out_dir / f"{arguments.prefix}index.png"))
        page.goto(f"{(root / 'feature.html').as_uri()}?v={arguments.variant}&f={feature}")
        page.wait_for_selector(".partner")
        page.screenshot(path=str(arguments.out_dir / f"{arguments.prefix}feature.png"), full_page=True)
        browser.close()
    if problems:
        raise SystemExit(f"the browser reported: {problems}")
    print(f"feature {feature}: {arguments.out_dir}/{arguments.prefix}index.png, {arguments.prefix}feature.png")


if __name__ == "__main__":
    main()
