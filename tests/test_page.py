"""The gateway's page (GET /), in a real headless browser: Debian's chromium driven by Playwright.

The gateway runs under gunicorn in front of model_server.py with the model trained here (notebook 00), as `make
serve` runs them offline. The test uploads the course's pants photo, waits for the chart, checks every bar against
the API's own answer for the same bytes and the top one is pants, drops the photo on the page, checks what the page
says for a URL the gateway refuses, and saves a screenshot to build/page.png (the README's is docs/page.png).

Where no chromium is installed this skips and says why; `.ci/run` installs it and sets ZOOMCAMP_REQUIRE_BROWSER=1,
and then a missing browser fails instead.
"""

from __future__ import annotations

import os
import shutil

import pytest
import requests

import capabilities
from conftest import ROOT
from contract import CLASSES
from gateways import running_gateway
from local_stack import PANTS_PHOTO
from servers import running_model_server

SCREENSHOT = ROOT / "build" / "page.png"
PHOTO_WIDTH = 400  # the dataset's pants photo is 400x534, and the page previews the file itself
# Without these, chromium on a machine with no internet tries its background services and logs the failures.
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return path
    reason = "no chromium on PATH (Debian: apt install chromium; or set CHROMIUM to a Chromium executable)"
    capabilities.unavailable(reason, capabilities.BROWSER)


@pytest.fixture(scope="module")
def browser():
    executable = chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


@pytest.fixture(scope="module")
def served(trained_model_base, tmp_path_factory):
    with (
        running_model_server(trained_model_base, rest_api_port=0) as server,
        running_gateway(server.grpc_target, tmp_path_factory.mktemp("page-gateway"), workers=1) as gw,
    ):
        yield gw


def test_the_page_is_self_contained_and_forbids_loading_anything_else(served):
    response = requests.get(f"{served.url}/", timeout=10)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/html")
    policy = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "img-src blob:" in policy
    html = response.text
    # No other origin anywhere in the page: no CDN, no fonts, no analytics.
    assert "http://" not in html and "https://…" in html and html.count("https://") == 1
    assert "<link" not in html and 'src="http' not in html


def test_a_chosen_photo_becomes_a_chart_that_matches_the_api(dataset, served, browser, tmp_path):
    photo = tmp_path / "pants.jpg"
    photo.write_bytes(PANTS_PHOTO.read_bytes())
    expected = requests.post(
        f"{served.url}/predict?detail=1&top_k=10", files={"image": photo.read_bytes()}, timeout=30
    ).json()
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    failures = []
    page.on("requestfailed", lambda request: failures.append(request.url))
    outside = []  # anything but this gateway and the photo's local blob

    def watch(request):
        if not request.url.startswith((served.url, f"blob:{served.url}")):
            outside.append(request.url)

    page.on("request", watch)
    page.goto(f"{served.url}/")
    page.set_input_files("#file", str(photo))
    page.wait_for_selector("#bars .bar", timeout=30_000)
    bars = page.eval_on_selector_all("#bars .bar", "rows => rows.map(r => [r.dataset.class, +r.dataset.probability])")
    probabilities = expected["predictions"][0]["probabilities"]
    assert sorted(name for name, _ in bars) == sorted(CLASSES)
    for name, probability in bars:
        assert probability == pytest.approx(probabilities[name], abs=1e-9), name
    assert [p for _, p in bars] == sorted((p for _, p in bars), reverse=True), "the bars are ranked"
    top = page.eval_on_selector("#bars .bar.top", "row => row.dataset.class")
    assert top == max(probabilities, key=probabilities.get) == expected["predictions"][0]["top"][0]["class"] == "pants"
    model = expected["model"]
    assert page.inner_text('[data-key="model"]') == f"{model['name']}, version {model['version']}"
    assert "ms in all" in page.inner_text('[data-key="timings"]')
    assert page.eval_on_selector("#drop img", "img => img.naturalWidth") == PHOTO_WIDTH
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert not failures and not outside, (failures, outside)
    page.close()


DROP = """bytes => {
    const transfer = new DataTransfer();
    transfer.items.add(new File([new Uint8Array(bytes)], "dropped.jpg", { type: "image/jpeg" }));
    return transfer;
}"""


def test_a_photo_dropped_on_the_page_is_classified(dataset, served, browser):
    """Drag and drop as a browser delivers it: dragenter marks the drop zone, the drop carries the file."""
    data = PANTS_PHOTO.read_bytes()
    expected = requests.post(f"{served.url}/predict?detail=1", files={"image": data}, timeout=30).json()
    page = browser.new_page()
    page.goto(f"{served.url}/")
    transfer = page.evaluate_handle(DROP, list(data))
    page.dispatch_event("#drop", "dragenter", {"dataTransfer": transfer})
    assert "over" in page.get_attribute("#drop", "class").split()
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
    page.wait_for_selector("#bars .bar.top", timeout=30_000)
    assert "over" not in page.get_attribute("#drop", "class").split()
    top = page.eval_on_selector("#bars .bar.top", "row => row.dataset.class")
    assert top == expected["predictions"][0]["top"][0]["class"] == "pants"
    assert page.eval_on_selector("#drop img", "img => img.naturalWidth") == PHOTO_WIDTH
    page.close()


def test_a_refused_url_is_explained(served, browser):
    page = browser.new_page()
    page.goto(f"{served.url}/")
    page.fill("#url", "http://127.0.0.1:9/photo.jpg")  # loopback: the gateway refuses it before connecting
    page.click("#go")
    page.wait_for_selector("#error[data-code]", timeout=30_000)
    assert page.get_attribute("#error", "data-code") == "url_blocked"
    text = page.inner_text("#error")
    assert "only from public addresses" in text and "request " in text
    assert page.is_hidden("#result")
    page.close()
