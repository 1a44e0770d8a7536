"""`clipcond serve` end to end in a real browser: the server runs as `python -m clipcond serve` on tiny runs, and a
headless Chromium (Debian's `chromium` + `chromium-driver`, which `.ci/run` installs) types, clicks and reads the
page through Selenium. Skipped, saying what is missing, only where Chromium, its driver or Selenium is not there."""

from __future__ import annotations

import io
import json
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio", reason='`clipcond serve` needs Gradio: pip install "clipcond[ui]"')
webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs Selenium: pip install selenium")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from serve_screenshot import chromium, free_port, missing_browser, serving  # noqa: E402

from clipcond.pipeline_loading import DEFAULT_SAMPLER  # noqa: E402

MISSING = missing_browser()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"{MISSING} (.ci/run installs them)")

WAIT_S = 60  # a page action, a tiny 2-step request included
STEPS, NUM_IMAGES, SEED = 2, 3, 7
PROMPT = "a red circle"


@dataclass
class Server:
    url: str
    output_dir: Path  # its --output-dir: a folder per request
    temp_dir: Path  # Gradio's copies of uploads and outputs


@pytest.fixture(scope="module")
def server(pipeline_run, unclip_runs, tmp_path_factory):
    """A `clipcond serve` subprocess on both decoders and the prior, stopped after."""
    root = tmp_path_factory.mktemp("serve")
    output_dir, temp_dir = root / "requests", root / "gradio"
    argv = ["--model", str(pipeline_run), "--model", str(unclip_runs["decoder"]), "--prior", str(unclip_runs["prior"])]
    argv += ["--output-dir", str(output_dir), "--device", "cpu", "--dtype", "fp32"]
    with serving(argv, free_port(), root / "server.log", gradio_temp=temp_dir) as url:
        yield Server(url, output_dir, temp_dir)


@pytest.fixture(scope="module")
def browser(server):
    driver = chromium(1400, 1000)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(browser, server, tmp_path):
    """The page freshly loaded; a screenshot of it goes into the test's tmp folder at the end."""
    browser.get(server.url)
    WebDriverWait(browser, WAIT_S).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#generate-prompt textarea"))
    yield browser
    shot = tmp_path / "page.png"
    assert browser.save_screenshot(str(shot)), "Chromium took no screenshot"
    assert shot.stat().st_size > 0


def open_tab(driver, name: str) -> None:
    tab = next(b for b in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text.strip() == name)
    tab.click()


def set_number(driver, elem_id: str, value) -> None:
    field = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input")
    field.clear()
    field.send_keys(str(value))


def error_toast(driver, text: str) -> str:
    """The message of the error toast (how Gradio shows a `gr.Error`) that says `text`, once it shows; a toast
    stays 10 s, long enough to be read."""

    def shown(d):
        messages = [e.text for e in d.find_elements(By.CSS_SELECTOR, "[data-testid=toast-body].error")]
        return next((m for m in messages if text in m), None)

    return WebDriverWait(driver, WAIT_S).until(shown)


def download(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def read_jsonl(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


def test_generate_matches_the_command(page, server, pipeline_run, tmp_path):
    """Images typed for on the page are those `clipcond generate` draws with the same seed: same count, size,
    records and pixels."""
    from clipcond.cli import main

    page.find_element(By.CSS_SELECTOR, "#generate-prompt textarea").send_keys(PROMPT)
    set_number(page, "generate-seed", SEED)
    set_number(page, "generate-count", NUM_IMAGES)
    set_number(page, "generate-steps", STEPS)
    page.find_element(By.ID, "generate-button").click()

    def loaded(driver):
        images = driver.find_elements(By.CSS_SELECTOR, "#generate-gallery img")
        links = driver.find_elements(By.CSS_SELECTOR, "#generate-files a[download]")
        done = len(images) >= NUM_IMAGES and len(links) == NUM_IMAGES + 2  # the PNGs, images.jsonl, grid.png
        return done and all(driver.execute_script("return arguments[0].complete", img) for img in images)

    WebDriverWait(page, WAIT_S).until(loaded)
    images = page.find_elements(By.CSS_SELECTOR, "#generate-gallery img")
    sizes = [page.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", i) for i in images]
    sample_size = json.loads((pipeline_run / "unet" / "config.json").read_text())["sample_size"]
    assert sizes == [[sample_size, sample_size]] * NUM_IMAGES

    # What the page offers to download: the PNGs, then images.jsonl and grid.png.
    anchors = page.find_elements(By.CSS_SELECTOR, "#generate-files a[download]")
    links = {a.get_attribute("download"): a.get_attribute("href") for a in anchors}
    assert sorted(links) == [*(f"{k:05d}.png" for k in range(NUM_IMAGES)), "grid.png", "images.jsonl"]
    downloaded = download(links["images.jsonl"])
    (folder,) = server.output_dir.glob("*-generate")  # the request's own folder
    assert (folder / "images.jsonl").read_bytes() == downloaded
    records = read_jsonl(downloaded)
    command_dir = tmp_path / "command"
    argv = ["generate", "--model", str(pipeline_run), "--prompt", PROMPT, "--seed", str(SEED)]
    argv += ["--num-images", str(NUM_IMAGES), "--num-inference-steps", str(STEPS), "--output-dir", str(command_dir)]
    assert main([*argv, "--scheduler", DEFAULT_SAMPLER, "--device", "cpu", "--dtype", "fp32"]) == 0  # the page's
    assert records == read_jsonl((command_dir / "images.jsonl").read_bytes())
    assert [r["seed"] for r in records] == list(range(SEED, SEED + NUM_IMAGES))
    # The records panel shows them too: its label, then the JSON a token a line.
    label, *shown = page.find_element(By.ID, "generate-records").text.splitlines()
    assert json.loads("".join(shown)) == records
    for record in records:
        served = Image.open(io.BytesIO(download(links[record["file_name"]])))
        drawn = Image.open(command_dir / record["file_name"])
        np.testing.assert_array_equal(np.asarray(served), np.asarray(drawn), err_msg=record["file_name"])


def test_broken_upload_names_the_file(page, server, tmp_path):
    """A file that is no image is refused by its name, without the server's copy of it (its folder is the
    server's business)."""
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    open_tab(page, "Vary")
    page.find_element(By.CSS_SELECTOR, "#vary-upload input[type=file]").send_keys(str(broken))
    # Uploaded once the field offers the file back for download.
    WebDriverWait(page, WAIT_S).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, '#vary-upload a[download="broken.png"]')
    )
    page.find_element(By.ID, "vary-button").click()
    text = error_toast(page, "cannot be read as an image")
    assert "`image` 'broken.png' cannot be read as an image" in text
    assert "Traceback" not in text
    assert os.fspath(server.temp_dir) not in text


def test_empty_prompt_is_refused(page):
    page.find_element(By.ID, "generate-button").click()
    text = error_toast(page, "`prompt` is empty")
    assert "type what to draw" in text
