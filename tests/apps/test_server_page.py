"""The chat page at GET / in a real headless browser (Debian's chromium, driven by Playwright
with the system browser: no browser download): load it, attach an image file, ask, and see the
streamed answer and its timing appear. `EDGE_VLM_WRITE_SCREENSHOT=1` saves the README's picture
(on the VILA folder with the real SmolLM2, so the text is real model output)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.apps.test_server_support import Server

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = Path(__file__).resolve().parents[2] / "apps" / "server" / "screenshot.png"


def test_the_page_is_static_and_has_no_external_resources():
    page = (SCREENSHOT.parent / "static")
    text = "".join(p.read_text() for p in page.iterdir())
    assert "http://" not in text and "https://" not in text  # no CDN, no external fonts


def test_the_page_streams_an_answer_about_an_image_in_a_real_browser(request, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    shot = os.environ.get("EDGE_VLM_WRITE_SCREENSHOT") == "1"
    model = request.getfixturevalue("real_vila" if shot else "tiny_vila")
    s = Server(model, "--api-key", "page-key", "--max-context", "1024").wait_ready()
    image = tmp_path / "cat.png"
    if shot:
        from skimage import data

        Image.fromarray(data.chelsea()).save(image)
    else:
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(image)
    try:
        assert httpx.get(s.url + "/").headers["content-type"].startswith("text/html")  # the page needs no key
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 900, "height": 700})
            page.goto(s.url + "/")
            page.fill("#key", "page-key")
            page.dispatch_event("#key", "change")
            page.wait_for_function("document.getElementById('model').textContent.includes('context 1024')",
                                   timeout=60_000)
            page.set_input_files("#file", str(image))
            page.wait_for_selector("#thumb:not([hidden])")
            page.fill("#question", "What is in this picture?")
            page.click("#send")
            page.wait_for_function("document.getElementById('stats').textContent.includes('tokens/s')",
                                   timeout=300_000)
            answer = page.locator(".msg.assistant").last.inner_text()
            assert answer.strip() and "error" not in page.locator(".msg").last.get_attribute("class")
            assert page.locator(".msg.user img").count() == 1
            assert "time to first token" in page.inner_text("#stats")
            if shot:
                page.screenshot(path=str(SCREENSHOT))
            browser.close()
    finally:
        s.stop()
