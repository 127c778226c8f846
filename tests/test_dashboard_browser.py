"""The dashboard as a person uses it: ``python -m kdexp.dashboard`` on a directory where a real tiny run is training
(``python -m kdexp`` in a subprocess), opened in headless Chromium through Selenium and Debian's chromedriver.

Needs the student's Trainer to carry ``kdexp.core.live.LiveLog`` (it writes train_log.jsonl and heartbeat.json).
Set ``KDEXP_DASHBOARD_SCREENSHOT=docs/img/dashboard.png`` to refresh the README's screenshot.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from kdexp.dashboard.__main__ import free_port

webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e '.[dev]')")
By = pytest.importorskip("selenium.webdriver.common.by").By

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
LIVE = "outputs/sst2/kd1/live"


def _browser() -> tuple[str, str]:
    browser = next((p for p in map(shutil.which, BROWSERS) if p), None)
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("no Chromium and chromedriver on this machine (Debian: apt-get install chromium chromium-driver; "
                    ".ci/run installs them where it can)")
    return browser, driver


def wait_for(what: str, check, timeout: float, every: float = 0.5, alive=None):
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after ``timeout`` seconds, or at once
    when ``alive`` (a callable) says the process we wait on has died."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if alive is not None and not alive():
            pytest.fail(f"waiting for {what}: the process it depends on has exited")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=5) as r:
            return r.read().strip() == b"ok"
    except OSError:
        return False


def _finished_run(root: Path) -> None:
    """A complete run beside the live one (its results.json as main writes it, trimmed to what the table shows)."""
    run = root / "outputs" / "sst2" / "b0" / "done"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("method: {name: b0}\ntask: {name: sst2}\nseed: 1\n")
    (run / "results.json").write_text(json.dumps({
        "status": "complete", "run_key": "k", "method": "b0", "task": "sst2", "teacher": "tiny", "student": "tiny",
        "seed": 1, "config": {"method": {"name": "b0"}, "task": {"name": "sst2"}, "seed": 1},
        "main_metric": {"name": "accuracy", "value": 0.5, "validation_value": 0.5, "teacher_value": 0.6},
        "wall_time_s": 7.0}))


def _chrome(browser: str, driver: str):
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1500,1000"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


def _cells(chrome) -> list[str]:
    # The data grid paints on a canvas; its accessible copy holds the cell text.
    return [c.get_attribute("textContent") for c in chrome.find_elements(By.CSS_SELECTOR, "[role=gridcell]")]


def _row(chrome, label: str) -> list[str]:
    cells = _cells(chrome)
    return cells[cells.index(label):cells.index(label) + 4] if label in cells else []


def _logged_steps(chrome) -> int | None:
    found = re.search(rf"{re.escape(LIVE)}: running \(training\) · (\d+) logged step", chrome.find_element(
        By.TAG_NAME, "body").text)
    return int(found.group(1)) if found else None


def _settled(chrome) -> bool:
    """No element greyed out mid-rerun, and the charts drawn."""
    return chrome.execute_script("return document.querySelectorAll('[data-stale=\"true\"]').length == 0 && "
                                 "document.querySelectorAll('.vega-embed svg, .vega-embed canvas').length >= 4")


@pytest.mark.slow
def test_dashboard_lists_runs_and_the_live_curve_grows_while_the_run_trains(tmp_path):
    browser, driver = _browser()
    _finished_run(tmp_path)
    env = {**os.environ, "KDEXP_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "run.log", "w") as run_log, open(tmp_path / "dashboard.log", "w") as dash_log:
        trainer = subprocess.Popen([sys.executable, "-m", "kdexp", "experiment=smoke", "train.max_steps=100000",
                                    "hardware.torch_threads=1", f"hydra.run.dir={tmp_path / LIVE}"], cwd=tmp_path,
                                   env=env, stdout=run_log, stderr=subprocess.STDOUT)
        dashboard = subprocess.Popen([sys.executable, "-m", "kdexp.dashboard", str(tmp_path / "outputs"), "--port",
                                      str(port)], cwd=tmp_path, env=env, stdout=dash_log, stderr=subprocess.STDOUT)
        chrome = None
        try:
            chrome = _check(tmp_path, url, trainer, dashboard, browser, driver)
        finally:
            if chrome is not None:
                chrome.quit()
            for proc in (trainer, dashboard):
                if proc.poll() is None:
                    proc.kill()
                proc.wait(timeout=30)


def _check(tmp_path: Path, url: str, trainer, dashboard, browser: str, driver: str):
    wait_for("the dashboard to print its URL", lambda: f"kdexp dashboard: {url}" in (tmp_path / "dashboard.log")
             .read_text(), 120, alive=lambda: dashboard.poll() is None)
    wait_for("the dashboard to serve", lambda: _healthy(url), 180, alive=lambda: dashboard.poll() is None)
    curve = tmp_path / LIVE / "train_log.jsonl"
    wait_for("train_log.jsonl from the training run (is kdexp.core.live.LiveLog wired into the student's Trainer?)",
             curve.is_file, 300, alive=lambda: trainer.poll() is None)
    chrome = _chrome(browser, driver)
    chrome.get(f"{url}/?page=runs")
    wait_for("the runs table to list both runs", lambda: _row(chrome, LIVE) and _row(chrome, "outputs/sst2/b0/done"),
             120)
    assert "running" in _row(chrome, LIVE) and "complete" in _row(chrome, "outputs/sst2/b0/done")

    chrome.get(f"{url}/?page=curves&run={LIVE}")
    first = wait_for("the live run's curve on the curves page", lambda: _logged_steps(chrome), 120)
    wait_for("the live curve to gain points", lambda: (_logged_steps(chrome) or 0) > first, 120)
    wait_for("the charts to settle", lambda: _settled(chrome), 60)
    chrome.save_screenshot(str(tmp_path / "dashboard.png"))
    if os.environ.get("KDEXP_DASHBOARD_SCREENSHOT"):
        shutil.copy(tmp_path / "dashboard.png", os.environ["KDEXP_DASHBOARD_SCREENSHOT"])

    trainer.send_signal(signal.SIGKILL)  # a killed run keeps its curve and shows as killed
    trainer.wait(timeout=30)
    assert len(curve.read_text().splitlines()) >= first
    chrome.get(f"{url}/?page=runs")
    wait_for("the killed run's status", lambda: "killed" in _row(chrome, LIVE), 60)
    return chrome
