"""A real browser on the MLflow UI that `sr-pipeline ui` serves.

Debian's Chromium (`apt-get install chromium`, which `.ci/run` does) driven by the Python
Playwright package with `executable_path`; Playwright's own browser download is never used.
The test skips, saying why, only when that Chromium is absent or cannot start on this machine.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fixtures_ops import CHROMIUM, CHROMIUM_ARGS, browse_run, log_validation_run, running_ui


def _chromium_or_skip() -> Path:
    if not CHROMIUM.exists():
        found = shutil.which("chromium")
        if not found:
            pytest.skip(
                "Debian's chromium is not installed (/usr/bin/chromium missing): "
                "`apt-get install chromium` (.ci/run does it when apt is available)"
            )
        return Path(found)
    return CHROMIUM


def test_browser_finds_the_run_its_val_psnr_and_the_comparison_image(tmp_path: Path) -> None:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    chromium = _chromium_or_skip()
    run = log_validation_run(tmp_path)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with running_ui(tmp_path) as server, sync_playwright() as pw:
        try:
            context = pw.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"),  # a fresh, empty profile
                executable_path=str(chromium),
                headless=True,
                args=CHROMIUM_ARGS,
                viewport={"width": 1600, "height": 1000},
            )
        except PlaywrightError as exc:
            pytest.skip(f"{chromium} cannot start here: {str(exc).splitlines()[0]}")
        try:
            page = context.pages[0] if context.pages else context.new_page()
            saved = browse_run(page, server.url, run, shots)
        finally:
            context.close()
    assert [p.name for p in saved] == [
        "1-runs.png", "2-run-overview.png", "3-val-psnr-chart.png", "4-comparison-artifact.png"
    ]
    assert all(p.stat().st_size > 10_000 for p in saved)  # real renders, not blank pages
    print(f"screenshots: {shots}")
