"""Helpers for the operations tests: a run logged through the real tracking code, a real
`sr-pipeline ui` process, and the browser walk through the MLflow UI.

The browser walk (:func:`browse_run`) takes the run to look for as arguments, so the same code
can browse the run that `sr-pipeline demo` produces.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from helpers import BIN, free_port, pids_with, stop_session

CHROMIUM = Path("/usr/bin/chromium")
# Flags that keep headless Chromium off the (closed) network and quiet on a root account.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass
class LoggedRun:
    tracking_uri: str
    experiment_name: str
    experiment_id: str
    run_id: str
    run_name: str
    psnr: list[float]  # val/psnr at steps 0, 1, ...
    image_path: str  # artifact path of the comparison image
    image_bytes: bytes
    image_size: tuple[int, int]  # (width, height)
    registered_model: str | None = None  # e.g. "dnlan-x2": the run page must link its version


def comparison_png(tmp_dir: Path, scale: int = 2, size: int = 96) -> tuple[Path, tuple[int, int]]:
    """A real side-by-side PNG (bicubic upscale of the downscaled crop | HR crop) from a
    photograph bundled with scikit-image; the kind of image `train` logs under validation/."""
    import numpy as np
    from PIL import Image
    from skimage import data

    from pipeline.imageio import write_png

    hr = data.astronaut()[40 : 40 + size, 180 : 180 + size]
    lr = Image.fromarray(hr).resize((size // scale, size // scale), Image.BICUBIC)
    bicubic = np.asarray(lr.resize((size, size), Image.BICUBIC))
    panel = np.concatenate([bicubic, hr], axis=1)
    path = tmp_dir / "compare_epoch0003.png"
    write_png(path, panel)
    return path, (panel.shape[1], panel.shape[0])


def log_validation_run(tmp_dir: Path, experiment: str = "dnlan-ui-check", run_name: str = "ui-check") -> LoggedRun:
    """Log, into the default store, a run shaped like a training run's validation record."""
    from mlflow.tracking import MlflowClient

    from pipeline import tracking

    uri = tracking.resolve_uri(None)
    exp_id = tracking.experiment_id(experiment, uri)
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(exp_id, run_name=run_name)
    psnr = [27.18, 29.64, 30.87, 31.42]
    for step, value in enumerate(psnr):
        client.log_metric(run.info.run_id, "val/psnr", value, step=step)
    png, size = comparison_png(tmp_dir)
    client.log_artifact(run.info.run_id, str(png), artifact_path="validation")
    client.set_terminated(run.info.run_id)
    return LoggedRun(
        tracking_uri=uri,
        experiment_name=experiment,
        experiment_id=exp_id,
        run_id=run.info.run_id,
        run_name=run_name,
        psnr=psnr,
        image_path=f"validation/{png.name}",
        image_bytes=png.read_bytes(),
        image_size=size,
    )


# ---------------------------------------------------------------------------------------------
# A real `sr-pipeline ui` process
# ---------------------------------------------------------------------------------------------


@dataclass
class UiProcess:
    proc: subprocess.Popen
    url: str
    port: int
    stderr_path: Path
    server_pids: list[int]

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


def child_pids(pid: int) -> list[int]:
    return pids_with(1, pid)


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@contextmanager
def running_ui(tmp_dir: Path, *args: str, port: int | None = None, timeout: float = 120) -> Iterator[UiProcess]:
    """Start `sr-pipeline ui` for real, wait for the URL line it prints, stop it afterwards.

    Whatever the test did, the ui process and its server's process group are gone on exit.
    """
    port = port or free_port()
    stderr_path = tmp_dir / f"ui-{port}.stderr"
    with open(stderr_path, "w") as err:
        proc = subprocess.Popen(
            [str(BIN / "sr-pipeline"), "ui", "--port", str(port), *args],
            stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True,
        )
    server_pids: list[int] = []
    try:
        url = _wait_for_url(proc, stderr_path, timeout)
        server_pids = child_pids(proc.pid)
        yield UiProcess(proc, url, port, stderr_path, server_pids)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        if proc.poll() is None:
            stop_session(proc)
        for pid in server_pids:  # the server runs in a session of its own
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if proc.stdout:
            proc.stdout.close()


def _wait_for_url(proc: subprocess.Popen, stderr_path: Path, timeout: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buffered = ""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            buffered += line
            if line.startswith("MLflow UI: "):
                return line.split("MLflow UI: ", 1)[1].strip()
            if not line and proc.poll() is not None:
                break
        elif proc.poll() is not None:
            break
    raise AssertionError(
        f"sr-pipeline ui printed no URL (exit code {proc.poll()}); stdout={buffered!r} "
        f"stderr={stderr_path.read_text(errors='replace')[-2000:]!r}"
    )


def listening_addresses(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp*) with a socket LISTENing on `port`."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, _, hex_port = fields[1].rpartition(":")
            if int(hex_port, 16) == port and fields[3] == "0A":  # 0A = LISTEN
                out.append(address)
    return out


LOOPBACK_V4_HEX = "0100007F"  # 127.0.0.1 in /proc/net/tcp byte order


# ---------------------------------------------------------------------------------------------
# The browser walk
# ---------------------------------------------------------------------------------------------


def browse_run(page, base_url: str, run: LoggedRun, shots: Path, timeout_ms: int = 60_000) -> list[Path]:
    """Open the UI like a user: experiment list -> experiment -> its runs -> the run -> metric
    -> image artifact. Asserts at each step; returns the screenshots it saved."""
    from playwright.sync_api import expect

    page.set_default_timeout(timeout_ms)
    saved = []
    # MLflow's one-time guidance popovers ("Got it") are modal: they hide the page from role
    # queries until dismissed, as a user would on a first visit. They animate in and re-render,
    # so a plain click can wait on an unstable or detached button and raise inside Playwright's
    # handler; _dismiss_popovers never raises, and the handler runs again while one is shown.
    page.add_locator_handler(
        page.get_by_role("button", name="Got it", exact=True), _dismiss_popovers, no_wait_after=True
    )

    def shot(name: str) -> None:
        path = shots / f"{name}.png"
        _close_assistant(page)
        page.screenshot(path=str(path))
        saved.append(path)

    # 1. The experiment list shows the experiment; its link leads to the experiment.
    page.goto(f"{base_url}/#/experiments")
    page.get_by_role("link", name=run.experiment_name, exact=True).click()
    page.wait_for_url(f"**/#/experiments/{run.experiment_id}/**")

    # 2. The runs table. Measured with MLflow 3.17.2: although the pipeline tags its experiments
    # mlflow.experimentKind=custom_model_development, the experiment list's link carries the
    # list's own workflow toggle (GenAI by default) and lands on #/experiments/<id>/overview/
    # usage?workflowType=genai; the runs table has its own route. (Printed, not asserted.)
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_url(re.compile(rf".*#/experiments/{run.experiment_id}/runs.*"), timeout=5_000)
    except PlaywrightTimeout:
        shot("0-experiment-landing")
    landing = page.url
    print(f"experiment link landed on {landing}")
    if "/runs" not in landing:
        page.goto(f"{base_url}/#/experiments/{run.experiment_id}/runs")
    # `expect` has its own 5 s default, too short on a loaded 2-core machine: pass the timeout.
    run_link = page.get_by_role("link", name=run.run_name, exact=True)
    expect(run_link).to_be_visible(timeout=timeout_ms)
    expect(run_link).to_have_attribute("href", re.compile(rf"/runs/{run.run_id}\b"), timeout=timeout_ms)
    shot("1-runs")
    # The link's target is checked above; open it by URL rather than by a click that a
    # re-rendering table or a popover can swallow.
    page.goto(f"{base_url}/#/experiments/{run.experiment_id}/runs/{run.run_id}")
    page.wait_for_url(f"**/runs/{run.run_id}**")

    # 3. The run's overview lists val/psnr with its latest value.
    row = page.get_by_role("row").filter(has_text="val/psnr")
    expect(row).to_have_count(1, timeout=timeout_ms)
    shown = [float(x) for x in re.findall(r"\d+\.?\d*", row.inner_text().replace("val/psnr", ""))]
    assert any(abs(x - run.psnr[-1]) < 0.01 for x in shown), (row.inner_text(), run.psnr[-1])
    if run.registered_model:  # the version registered from this run, linked from its page
        expect(page.get_by_role("link", name=re.compile(re.escape(run.registered_model))).first).to_be_visible(
            timeout=timeout_ms
        )
    shot("2-run-overview")

    # 4. Model metrics: a rendered chart whose legend names the run and the metric.
    page.get_by_role("tab", name="Model metrics").click()
    # A real run has many metric sections (train/, val/, eval/...), some collapsed: search for
    # the metric like a user would, which shows its chart alone.
    page.get_by_placeholder("Search metric charts").fill("val/psnr")
    expect(page.get_by_text(f"{run.run_name} (val/psnr)")).to_be_visible(timeout=timeout_ms)
    expect(page.locator(".js-plotly-plot").first).to_be_visible(timeout=timeout_ms)
    shot("3-val-psnr-chart")

    # 5. Artifacts: the comparison image under validation/ is displayed (decoded by the browser).
    page.get_by_role("tab", name="Artifacts").click()
    folder, _, filename = run.image_path.rpartition("/")
    page.get_by_text(folder, exact=True).first.click()
    page.get_by_text(filename, exact=True).first.click()
    width, height = run.image_size
    page.wait_for_function(
        "([w, h]) => [...document.images].some(i => i.complete && i.naturalWidth === w && i.naturalHeight === h)",
        arg=[width, height],
    )
    shot("4-comparison-artifact")
    return saved


def _dismiss_popovers(button) -> None:
    """Click every shown "Got it" button without letting an error escape: a popover that is
    still animating, or re-rendered under the click, is simply dismissed on the next call."""
    from playwright.sync_api import Error as PlaywrightError

    try:
        for i in range(button.count()):
            button.nth(i).click(force=True, timeout=2_000, no_wait_after=True)
    except PlaywrightError:
        try:
            button.page.keyboard.press("Escape")
        except PlaywrightError:
            pass


def _close_assistant(page) -> None:
    """Close MLflow's assistant side panel when present (it covers a third of the page)."""
    close = page.get_by_role("button", name="Close", exact=True)
    if close.count() == 1 and close.is_visible():
        close.click()
        close.wait_for(state="hidden")
