"""The playground page in headless Chromium: type a prompt, generate (streamed), open the
deductive panel and check that the layer 0 / head 0 heatmap is drawn from the server's numbers.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them) and selenium;
skipped, with the reason, without them. ``PLDR_PLAYGROUND_SCREENSHOT=docs/playground.png`` also
saves a screenshot of the page.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver")

from serve_support import build_bundle, live_server  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.fixture()
def browser():
    if not CHROMIUM or not DRIVER:
        pytest.skip("headless Chromium not installed (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.add_argument("--window-size=1280,1500")
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


# Counts the distinct colours of a canvas and whether every pixel is opaque.
CANVAS_PIXELS = """
const c = document.getElementById(arguments[0]);
if (!c || !c.width) return null;
const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
const colours = new Set();
let opaque = true;
for (let i = 0; i < d.length; i += 4) {
  colours.add(d[i] + ',' + d[i + 1] + ',' + d[i + 2]);
  if (d[i + 3] !== 255) opaque = false;
}
return [c.width, c.height, colours.size, opaque];
"""


@pytest.mark.slow
def test_playground_generates_and_draws_the_deductive_heatmaps(browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from pldr_llm.bundle import load_bundle
    from pldr_llm.generation import generate_text

    folder = build_bundle(tmp_path)
    # A seed whose 24 tokens are not all blank (the random model may also end at once): the
    # library's text with the page's default sampling (temperature 0.8), which the page shows.
    text = "The power law graph attention"
    model, tok = load_bundle(str(folder))
    shown = tok.decode(tok.prompt_ids(text))
    seed = next(
        s
        for s in range(7, 60)
        if generate_text(model, tok, text, 24, temperature=0.8, seed=s)[len(shown) :].strip()
    )
    with live_server(folder) as (url, _):
        browser.get(url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: "context" in d.find_element(By.ID, "model-name").text)
        prompt = browser.find_element(By.ID, "prompt")
        prompt.send_keys(text)
        tokens = browser.find_element(By.ID, "max-tokens")
        tokens.clear()
        tokens.send_keys("24")
        browser.find_element(By.ID, "seed").send_keys(str(seed))
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("done"))
        assert browser.find_element(By.ID, "output-text").text.strip()

        browser.find_element(By.ID, "deductive-button").click()
        wait.until(
            lambda d: d.find_element(By.ID, "deductive-panel").get_attribute("data-drawn") == "G_LM"
        )
        width, height, colours, opaque = browser.execute_script(CANVAS_PIXELS, "heatmap-0-0")
        # dk = 8 cells of 12 x 12 pixels, every one painted; a real matrix has many values.
        assert (width, height) == (96, 96) and opaque and colours > 8
        spectrum = browser.execute_script(CANVAS_PIXELS, "spectrum-0-0")
        assert spectrum is not None and spectrum[2] > 1  # a line on the white background
        heatmaps = browser.find_elements(By.CSS_SELECTOR, "#heatmaps canvas")
        assert len(heatmaps) == 2 * 2  # layers x heads
        target = os.environ.get("PLDR_PLAYGROUND_SCREENSHOT")
        browser.save_screenshot(target or str(tmp_path / "playground.png"))
