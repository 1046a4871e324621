"""End to end in a real browser: a tiny real run, ``make ui`` serving its store, Debian's headless Chromium.

What a person does after a run: open the printed address, find the run, look at the loss charts and at the
reconstruction panel. The test does the same through Playwright, connected over the DevTools protocol to a
Chromium that it starts itself (Playwright never downloads a browser here), and saves a screenshot of each
page in its tmp dir. It only ever talks to 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from processes import stop_group, wait_http
from runs import REPO, run_deepspeed

from pcrl.distributed import free_port

CHROMIUM = Path("/usr/bin/chromium")
# Slow pages on a loaded 2-core machine (a concurrent DeepSpeed test) must not fail the test.
PAGE_TIMEOUT_MS = 90_000

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="Debian's chromium is not installed (.ci/run installs it: apt-get install chromium)",
    ),
]


@pytest.fixture(scope="module")
def tiny_run(sample_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 4-step run on real CT/MRI shards with a reconstruction panel at steps 2 and 4."""
    out = tmp_path_factory.mktemp("ui_runs")
    overrides = [
        f"data.shards={sample_shards}",
        f"run.output_dir={out}",
        "run.name=ui-run",
        "train.max_steps=4",
        "train.log_every=2",
        "tracking.image_every=2",
    ]
    proc = run_deepspeed(1, overrides)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = out / "ui-run"
    assert sorted(p.name for p in (run_dir / "images").iterdir()) == [
        "recon_step_00000002.png",
        "recon_step_00000004.png",
    ]
    return run_dir


@pytest.fixture(scope="module")
def ui_address(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``make ui RUN=<run>`` on a free port; yields the address it prints, stops the server's group after."""
    log = tmp_path_factory.mktemp("ui_server") / "make-ui.log"
    port = free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    cmd = ["make", "--no-print-directory", "ui", f"RUN={tiny_run}", f"PORT={port}", f"VENV={sys.prefix}"]
    with log.open("w") as f:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, log)
        printed = re.search(r"http://127\.0\.0\.1:\d+\S*", log.read_text())
        assert printed, f"make ui printed no address:\n{log.read_text()[-3000:]}"
        assert printed.group(0).startswith(f"http://127.0.0.1:{port}/")
        yield printed.group(0)
    finally:
        stop_group(proc)


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A Playwright page in Debian's headless Chromium, started with a fresh profile; killed after."""
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is a dev dependency: pip install -e '.[dev]'"
    )
    profile = Path(tempfile.mkdtemp(prefix="chromium-", dir=tmp_path_factory.mktemp("chromium")))
    log = profile.parent / "chromium.log"
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        f"--user-data-dir={profile}",
        # Chromium picks a free port and writes it to DevToolsActivePort in the profile: no port race.
        "--remote-debugging-port=0",
        # Nothing but this machine: any other host name fails to resolve.
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        "--window-size=1600,1000",
        "about:blank",
    ]
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None, f"chromium exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, (
                f"chromium wrote no DevToolsActivePort:\n{log.read_text()[-3000:]}"
            )
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.connect_over_cdp(f"http://127.0.0.1:{port}", timeout=PAGE_TIMEOUT_MS)
            context = browser.contexts[0] if browser.contexts else browser.new_context()
            page = context.new_page()
            page.set_viewport_size({"width": 1600, "height": 1000})
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            yield page
            browser.close()
    finally:
        stop_group(proc)


def _close_assistant(page) -> None:  # type: ignore[no-untyped-def]
    # MLflow 3 opens an assistant side panel; closed, the screenshots show the run itself.
    close = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
    if close.count():
        close.first.click()


def test_ui_shows_the_run_its_charts_and_the_reconstruction_panel(
    tiny_run: Path, ui_address: str, browser_page, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """The address ``make ui`` prints lists the run; the run's metric charts render (``loss/total``, grouped
    by prefix); the reconstruction panel artifact is displayed as a loaded image. Pins the whole path a user
    takes: engine hook → PNG → MLflow artifact → a server that serves file:// artifacts → the browser."""
    page = browser_page
    shots = tmp_path / "screenshots"
    shots.mkdir()

    # the experiment's run list, at the address make ui printed
    page.goto(ui_address)
    run_link = page.get_by_role("link", name="ui-run")
    run_link.first.wait_for()
    # The address opens MLflow's "Model training" view; remember it as the choice a user makes once with
    # the toggle at the top left, or MLflow 3 falls back to its GenAI view on the next page.
    page.evaluate("localStorage.setItem('mlflow.workflowType_v1', JSON.stringify('machine_learning'))")
    page.reload()
    run_link.first.wait_for()
    _close_assistant(page)
    page.screenshot(path=shots / "runs.png")

    # the run page's metric charts: a chart card for loss/total with a drawn line
    run_link.first.click()
    page.get_by_role("tab", name="Model metrics").click()
    header = page.locator('[data-testid="experiment-view-compare-runs-section-header"]')
    header.first.wait_for()
    for group in ("loss", "perf", "optim", "memory", "schedule", "val", "health/scale0"):
        assert header.filter(has_text=group).count(), group
    # The page renders only the chart cards in view, and the health/ sections sort above loss/: look the
    # chart up with the search box, as a user would.
    page.get_by_placeholder("Search metric charts").fill("loss/total")
    card = page.locator('[data-testid="experiment-view-compare-runs-card"]', has_text="loss/total")
    card.locator("svg .scatterlayer .trace path.js-line").first.wait_for()
    assert card.locator("svg .scatterlayer .trace .points path").count() == 2  # steps 2 and 4
    _close_assistant(page)
    page.screenshot(path=shots / "charts.png")

    # the reconstruction panel in the artifact view
    page.get_by_role("tab", name="Artifacts").click()
    page.get_by_text("images", exact=True).first.click()
    page.get_by_text("recon_step_00000004.png").first.click()
    image = page.locator('img[alt="images/recon_step_00000004.png"]')
    image.wait_for()
    page.wait_for_function(
        "() => { const i = document.querySelector('img[alt=\"images/recon_step_00000004.png\"]');"
        " return i && i.complete && i.naturalWidth > 0; }"
    )
    width = image.evaluate("i => i.naturalWidth")
    from PIL import Image

    with Image.open(tiny_run / "images/recon_step_00000004.png") as png:
        assert width == png.width
    _close_assistant(page)
    page.screenshot(path=shots / "reconstruction.png")
    for name in ("runs.png", "charts.png", "reconstruction.png"):
        assert (shots / name).stat().st_size > 10_000, name
