"""A real browser on the MLflow UI that `sr-pipeline ui` serves.

Debian's Chromium (`apt-get install chromium`, which `.ci/run` does) driven by the Python
Playwright package with `executable_path`; Playwright's own browser download is never used.
The run it browses is the one `sr-pipeline demo` made (the `demo_run` session fixture), as a
new user would after `make demo`. The test skips, saying why, only when that Chromium is absent
or cannot start on this machine.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fixtures_ops import CHROMIUM, CHROMIUM_ARGS, LoggedRun, browse_run, running_ui

pytestmark = [pytest.mark.slow]


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


def demo_logged_run(demo_run, tmp_path: Path) -> LoggedRun:
    """What the browser must find, read back from the demo's MLflow run."""
    from mlflow.tracking import MlflowClient
    from PIL import Image

    client = MlflowClient(tracking_uri=demo_run.tracking_uri)
    run = client.get_run(demo_run.result["run_id"])
    exp = client.get_experiment(run.info.experiment_id)
    history = sorted(client.get_metric_history(run.info.run_id, "val/psnr"), key=lambda m: m.step)
    images = sorted(a.path for a in client.list_artifacts(run.info.run_id, "validation") if a.path.endswith(".png"))
    assert history and images, "the demo run has no val/psnr history or no validation image"
    local = Path(client.download_artifacts(run.info.run_id, images[-1], str(tmp_path)))
    with Image.open(local) as im:
        size = im.size
    return LoggedRun(
        tracking_uri=demo_run.tracking_uri, experiment_name=exp.name, experiment_id=exp.experiment_id,
        run_id=run.info.run_id, run_name=run.info.run_name, psnr=[m.value for m in history],
        image_path=images[-1], image_bytes=local.read_bytes(), image_size=size,
        registered_model=f"dnlan-x{run.data.params['model.scale']}",
    )


def test_browser_finds_the_demo_run_its_val_psnr_and_the_comparison_image(
    demo_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    chromium = _chromium_or_skip()
    run = demo_logged_run(demo_run, tmp_path)
    monkeypatch.setenv("SR_PIPELINE_HOME", str(demo_run.home))  # `sr-pipeline ui` opens the demo's store
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
        except PlaywrightError as exc:  # installed but broken is a failure, not a skip
            pytest.fail(f"{chromium} is installed but cannot start: {str(exc).splitlines()[0]}")
        try:
            page = context.pages[0] if context.pages else context.new_page()
            saved = browse_run(page, server.url, run, shots)
        finally:
            context.close()
    saved = [p for p in saved if p.name != "0-experiment-landing.png"]  # kept, see browse_run
    assert [p.name for p in saved] == [
        "1-runs.png", "2-run-overview.png", "3-val-psnr-chart.png", "4-comparison-artifact.png"
    ]
    assert all(p.stat().st_size > 10_000 for p in saved)  # real renders, not blank pages
    for path in saved:  # kept under pytest's tmp dir (the last few sessions are kept)
        print(f"screenshot: {path}")
