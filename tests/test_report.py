"""``lifecycle report``: the page's content, its artifact, bad input, and the page in a real headless
Chromium (no console errors, no network request, every section and picture there, not blank)."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from lifecycle.report.render import SECTIONS
from tests import servers
from tests.cli import cli

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]
HOSTILE = "<script>console.error('injected')</script> <img src=x onerror=alert(1)> R&D"



@pytest.fixture(scope="module")
def report(lifecycle_history, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("report") / "report.html"
    # Text from MLflow is shown as text: a description that looks like markup must not run.
    mlflow.MlflowClient().update_registered_model(lifecycle_history["name"], description=HOSTILE)
    assert cli(*["report", lifecycle_history["name"], "--out", str(out)]) == 0
    return {"path": out, "html": out.read_text(encoding="utf-8"), **lifecycle_history}


def test_report_holds_every_section_and_is_logged(report, capsys):
    html, name = report["html"], report["name"]
    for sid in SECTIONS:
        assert f'<section id="{sid}">' in html
    # Lineage: both data runs of v2, its training run, its parent version.
    v2 = mlflow.MlflowClient().get_model_version(name, "2")
    for run_id in (v2.tags["base_data_run_id"][:12], v2.tags["data_run_id"][:12], v2.tags["train_run_id"][:12]):
        assert run_id in html
    assert "fine-tune of v1" in html
    # Gates of each ledger event (the refused production promotion names its failing gate), the
    # ledger's rollback, the champion/challenger table and the monitor verdict.
    assert "missing required tag(s): approved_by" in html and ">rollback<" in html
    assert "champion" in html and "challenger" in html and v2.tags["compare/loss_delta"][:6] in html
    assert report["monitor_run"][:12] in html and "monitor/input_drift_psi" in html
    # Pictures are inside the page; nothing is fetched from anywhere.
    assert len(re.findall(r'src="data:image/png;base64,', html)) >= 6  # curves, bars, ledger, 3 monitor plots
    assert not re.search(r'(?:src|href)="(?:https?:)?//', html)
    assert "<svg" in html
    assert HOSTILE not in html and "&lt;script&gt;console.error(&#x27;injected&#x27;)&lt;/script&gt;" in html

    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.model_name = '{name}' and tags.`lifecycle.stage` = 'report'")
    assert runs
    logged = Path(mlflow.artifacts.download_artifacts(f"runs:/{runs[0].info.run_id}/report/{name}.html"))
    assert logged.read_text(encoding="utf-8") == html
    summary = json.loads(Path(mlflow.artifacts.download_artifacts(
        f"runs:/{runs[0].info.run_id}/report/report.json")).read_text())
    assert [v["version"] for v in summary["versions"]][:2] == ["1", "2"]


def test_report_bad_input(report, tmp_path, capsys):
    path = report["path"]
    before = path.read_text(encoding="utf-8")
    assert cli(*["report", report["name"], "--out", str(path)]) == 6
    assert "--overwrite" in capsys.readouterr().err
    assert path.read_text(encoding="utf-8") == before
    missing = tmp_path / "none.html"
    assert cli(*["report", "no-such-model", "--out", str(missing)]) == 5
    assert "no registered model 'no-such-model'" in capsys.readouterr().err
    assert not missing.exists() and not list(tmp_path.glob(".none.html*"))
    # A model with no history yet still gets a page that says so.
    empty = f"{report['name']}-empty"
    mlflow.MlflowClient().create_registered_model(empty)
    assert cli(*["report", empty, "--out", str(tmp_path / "empty.html"), "--no-log"]) == 0
    page = (tmp_path / "empty.html").read_text(encoding="utf-8")
    assert "never monitored" in page and "no gate was ever evaluated" in page
    # The MLproject entry point runs the same command (here: replacing the file).
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
    proc = subprocess.run([sys.executable, str(REPO / "entrypoints" / "report.py"), f"name={report['name']}",
                           f"out={path}", "overwrite=true", "experiment="], capture_output=True, text=True,
                          env=env, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"-> {path}" in proc.stdout


# -- the page in a real browser ---------------------------------------------------------------------

def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class DevTools:
    """A headless Chromium driven over the DevTools protocol (one page, one websocket)."""

    def __init__(self, binary: str, profile: Path):
        import websocket

        # The background-networking flags keep Chromium from dialling out (refused in a closed network).
        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-extensions", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
             "--remote-debugging-port=0", "--remote-allow-origins=*", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("Chromium did not open its DevTools port")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        pages = []
        while not pages and time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
                pages = [t for t in json.load(resp) if t.get("type") == "page"]
            time.sleep(0.1)
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, method: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            if time.monotonic() > deadline:
                raise TimeoutError(method)
            self.ws.settimeout(max(0.1, deadline - time.monotonic()))
            self.events.append(json.loads(self.ws.recv()))

    def close(self) -> None:
        try:
            if getattr(self, "ws", None) is not None:
                self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def test_report_in_headless_chromium(report):
    binary = _chromium()
    missing = "Chromium is not installed (apt-get install chromium)" if binary is None else None
    if missing is None:
        try:
            import websocket  # noqa: F401
        except ImportError:
            missing = "websocket-client is not installed (pip install -e '.[test]')"
    servers.require("LIFECYCLE_REQUIRE_BROWSER", missing)

    profile = Path(tempfile.mkdtemp(prefix="lifecycle-chromium-"))
    browser = DevTools(binary, profile)
    try:
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.call(f"{domain}.enable")
        browser.call("Emulation.setDeviceMetricsOverride", width=1280, height=1600, deviceScaleFactor=1, mobile=False)
        browser.call("Page.navigate", url=report["path"].as_uri())
        browser.wait_for("Page.loadEventFired")
        state = json.loads(browser.call("Runtime.evaluate", returnByValue=True, expression="""JSON.stringify({
            sections: Array.from(document.querySelectorAll('section')).map(s => s.id),
            images: Array.from(document.images).map(i => [i.complete, i.naturalWidth]),
            svg: document.querySelectorAll('svg.lineage rect').length,
            localTimes: document.querySelectorAll('time[title]').length,
            times: document.querySelectorAll('time').length,
            ledgerRows: document.querySelectorAll('#ledger tbody tr').length})""")["result"]["value"])
        # The page's own script: hide ledger rows that moved nothing.
        browser.call("Runtime.evaluate", expression="var b=document.getElementById('effective-only');"
                                                    "b.checked=true;b.dispatchEvent(new Event('change'));")
        hidden = browser.call("Runtime.evaluate", returnByValue=True, expression=(
            "Array.from(document.querySelectorAll('#ledger tbody tr')).filter(r => r.style.display === 'none').length"
        ))["result"]["value"]
        shot = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
    finally:
        browser.close()
        shutil.rmtree(profile, ignore_errors=True)

    errors = [e["params"] for e in browser.events if e.get("method") == "Runtime.exceptionThrown"
              or (e.get("method") == "Runtime.consoleAPICalled" and e["params"].get("type") in ("error", "assert"))
              or (e.get("method") == "Log.entryAdded" and e["params"]["entry"].get("level") == "error")]
    assert not errors, errors
    fetched = [e["params"]["request"]["url"] for e in browser.events if e.get("method") == "Network.requestWillBeSent"]
    assert all(u.startswith(("file:", "data:")) for u in fetched), fetched
    assert state["sections"] == list(SECTIONS)
    assert len(state["images"]) >= 6 and all(done and width > 0 for done, width in state["images"])
    assert state["svg"] >= 8  # 2 data runs + 2 x (train, version, events) boxes
    assert state["times"] > 0 and state["localTimes"] == state["times"]
    page = report["path"].read_text(encoding="utf-8")  # as loaded (the entry point test may have rewritten it)
    rejected = sum(1 for row in page.split("<tr ") if row.startswith('data-effective="false"'))
    assert hidden == rejected > 0

    import matplotlib.image as mpimg
    import numpy as np

    pixels = mpimg.imread(io.BytesIO(shot), format="png")[..., :3]
    assert pixels.shape[:2] == (1600, 1280)
    # Not blank: many distinct colours and real contrast (a white or single-colour page has neither).
    assert float(pixels.std()) > 0.05
    assert len(np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 50
