"""The web dashboard of a live ``mpipeline run``, in a real headless chromium.

One supervisor (an HTTP gateway, a bearer token) serves the module; Selenium
drives Debian's ``chromium`` through Debian's ``chromium-driver`` (the same
version, from the same source package, so nothing is downloaded and the
protocol always matches). Requests go through the gateway with the official
``openai`` SDK; the page must show the run's stages and the very request
count ``/metrics`` reports, and must move when more requests come. The token
is checked over plain HTTP, and ``snapshot.json`` against a metrics snapshot
read straight from the run's segments, as ``mpipeline top`` reads them.

The page's screenshot is written under the test's tmp_path; set
``MPIPELINE_DASHBOARD_SCREENSHOT=docs/dashboard.png`` to refresh the README's.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By

from mpipeline import rundir
from mpipeline.metrics.snapshot import snapshot
from tests.conftest import require_binary
from tests.integration.conftest import (
    ConfigFactory,
    SupervisorFactory,
    SupervisorProcess,
    faults_env,
    run_segments,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

TOKEN_ENV = "MPIPELINE_TEST_DASHBOARD_TOKEN"
TOKEN = "dashboard-test-token-7f3a"
SEEN_TIMEOUT_S = 20.0
HTTP_TIMEOUT_S = 10.0
BROWSER_QUIT_S = 10.0
BURST = 5
# The assemble stage fails a request holding this: an error and a dead letter to show.
POISON = "BOOM"
FIX_CHROMIUM = "apt-get install chromium chromium-driver (scripts/setup.sh does)"
WINDOW = "1400,1300"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SupervisorProcess]:
    factory = SupervisorFactory(ConfigFactory(tmp_path_factory.mktemp("dashboard")))
    try:
        sp = factory(
            {"gateway.replicas": 1, "gateway.auth_token_env": TOKEN_ENV},
            env={TOKEN_ENV: TOKEN, **faults_env(f"assemble:raise_on={POISON}")},
        )
        yield sp
    finally:
        factory.stop_all()
    assert sp.wait_exit(0) == 0, sp.log()[-3000:]  # open streams did not hold the stop up
    assert run_segments(sp.run_id) == []


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    """Headless chromium; on teardown it and every process it started are gone."""
    chromium = require_binary("chromium", FIX_CHROMIUM)
    driver_path = require_binary("chromedriver", FIX_CHROMIUM)
    profile = tempfile.mkdtemp(prefix="mpipeline-chromium-")
    options = Options()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",  # the tests may run as root, where the sandbox refuses to start
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        f"--window-size={WINDOW}",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(arg)
    service = Service(executable_path=driver_path)
    driver = webdriver.Chrome(service=service, options=options)
    proc = service.process
    assert proc is not None
    tree = psutil.Process(proc.pid)
    try:
        yield driver
    finally:
        started = [tree, *tree.children(recursive=True)]
        driver.quit()
        _, left = psutil.wait_procs(started, timeout=BROWSER_QUIT_S)
        for p in left:
            p.kill()
        shutil.rmtree(profile, ignore_errors=True)
        assert not left, f"chromium processes outlived driver.quit(): {left}"


def _base(sp: SupervisorProcess) -> str:
    return str(sp.state["metrics_url"]).removesuffix("/metrics")


def _completed(sp: SupervisorProcess) -> int:
    """Requests completed, summed over clients, as /metrics says."""
    reply = httpx.get(
        sp.state["metrics_url"],
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=HTTP_TIMEOUT_S,
    )
    reply.raise_for_status()
    return round(
        sum(
            s.value
            for fam in text_string_to_metric_families(reply.text)
            for s in fam.samples
            if s.name == "mpipeline_requests_completed_total"
        )
    )


def _chat(client: openai.OpenAI, n: int | str) -> None:
    reply = client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": f"dashboard {n}"}]
    )
    assert reply.choices[0].message.content


def _text(driver: WebDriver, element_id: str) -> str:
    return str(driver.find_element(By.ID, element_id).text)


def _shown_completed(driver: WebDriver) -> int | None:
    text = _text(driver, "requests-completed").replace(",", "")
    return int(text) if text.isdigit() else None


def _page_matches_metrics(driver: WebDriver, sp: SupervisorProcess, at_least: int) -> int:
    """Poll until the page's counter is /metrics' counter (and that is at least ``at_least``)."""

    def same() -> int | None:
        want = _completed(sp)
        return want if want >= at_least and _shown_completed(driver) == want else None

    got: int = wait_until(same, SEEN_TIMEOUT_S, f"the page to show {at_least}+ completed")
    return got


@contextmanager
def _load(client: openai.OpenAI) -> Iterator[None]:
    """Chat completions from one thread until the block ends."""
    stop = threading.Event()
    failures: list[BaseException] = []

    def run() -> None:
        n = 0
        while not stop.is_set():
            try:
                _chat(client, n)
            except BaseException as exc:  # reported after the block
                failures.append(exc)
                return
            n += 1

    thread = threading.Thread(target=run, name="load", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(HTTP_TIMEOUT_S)
    assert not failures, failures


def test_the_page_shows_the_running_pipeline_and_updates(
    live: SupervisorProcess, browser: WebDriver, tmp_path: Path
) -> None:
    stages = {"gateway", *(name.rpartition("-")[0] for name in live.replica_names())}
    client = openai.OpenAI(base_url=live.url + "/v1", api_key=TOKEN, timeout=HTTP_TIMEOUT_S)
    with live.explain(), client:
        browser.get(f"{_base(live)}/dashboard?token={TOKEN}&interval=0.3")
        wait_until(lambda: _text(browser, "run-id") == live.run_id, SEEN_TIMEOUT_S, "the run id")
        assert _text(browser, "run-state") == "RUNNING"
        cards = browser.find_elements(By.CSS_SELECTOR, "#flow .stage")
        assert {c.get_attribute("data-stage") for c in cards} == stages
        assert _text(browser, "conn") == "live"

        for n in range(BURST):
            _chat(client, n)
        first = _page_matches_metrics(browser, live, BURST)
        with pytest.raises(openai.InternalServerError):
            _chat(client.with_options(max_retries=0), POISON)
        wait_until(
            lambda: (
                "stage_error" in _text(browser, "dlq") and "stage_error" in _text(browser, "errors")
            ),
            SEEN_TIMEOUT_S,
            "the failed request in the errors and the dead letters",
        )
        assert "assemble" in _text(browser, "dlq")

        # More traffic: the page moves on its own, rates included.
        with _load(client):
            wait_until(
                lambda: (
                    (_shown_completed(browser) or 0) > first
                    and _text(browser, "requests-per-s") not in ("–", "0.0")
                ),
                SEEN_TIMEOUT_S,
                "the counter and the rate to move",
            )
            inference = browser.find_element(By.CSS_SELECTOR, '.stage[data-stage="inference"]')
            assert int(inference.find_element(By.CLASS_NAME, "processed").text.replace(",", ""))
            shot = tmp_path / "dashboard.png"
            assert browser.save_screenshot(str(shot))
        _page_matches_metrics(browser, live, first + 1)

    assert shot.read_bytes().startswith(b"\x89PNG")
    keep = os.environ.get("MPIPELINE_DASHBOARD_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)


def test_without_the_token_the_page_and_its_data_are_refused(
    live: SupervisorProcess, browser: WebDriver
) -> None:
    base = _base(live)
    browser.get(f"{base}/dashboard")
    assert "missing or wrong bearer token" in browser.find_element(By.TAG_NAME, "body").text
    with httpx.Client(base_url=base, timeout=HTTP_TIMEOUT_S) as c:
        for path in ("/dashboard", "/dashboard/events", "/dashboard/snapshot.json"):
            assert c.get(path).status_code == 401, path
            assert c.get(path, params={"token": TOKEN + "x"}).status_code == 401, path


def test_snapshot_json_is_the_metrics_snapshot(live: SupervisorProcess) -> None:
    url = _base(live) + "/dashboard/snapshot.json"
    with rundir.connect(live.run_dir) as run:
        snap = snapshot(run)
    doc: dict[str, Any] = httpx.get(url, params={"token": TOKEN}, timeout=HTTP_TIMEOUT_S).json()
    assert doc["run"]["run_id"] == snap.run_id and doc["run"]["state"] == snap.state
    replicas = {r["name"]: r["pid"] for s in doc["stages"] for r in s["replicas"]}
    assert replicas == {r.name: r.pid for r in snap.replicas}
    assert [(r["name"], r["capacity"]) for r in doc["rings"]] == [
        (f"{e.producer} → {e.consumer}", e.capacity) for e in snap.edges
    ]
    assert [s["name"] for s in doc["shards"]] == [
        r.name for r in snap.replicas if r.stage == "inference"
    ]
    with openai.OpenAI(base_url=live.url + "/v1", api_key=TOKEN) as client:
        for n in range(2):
            _chat(client, n)

    def same() -> bool:
        got = httpx.get(url, params={"token": TOKEN}, timeout=HTTP_TIMEOUT_S).json()
        want = _completed(live)
        return want >= 2 and got["requests"]["completed"] == want

    # The traffic is over: the document's request count settles on /metrics' count.
    wait_until(same, SEEN_TIMEOUT_S, "snapshot.json's count to match /metrics")
