"""`clipcond serve` end to end in a real browser: the server runs as `python -m clipcond serve` on tiny runs, and a
headless Chromium (Debian's `chromium` + `chromium-driver`, which `.ci/run` installs) types, clicks and reads the
page through Selenium. Skipped, saying what is missing, only where Chromium, its driver or Selenium is not there."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
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

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
MISSING = [name for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if path is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING),
    reason=f"no {' or '.join(MISSING)} on PATH: install Debian's `chromium` and `chromium-driver` (as .ci/run does)",
)

SERVER_START_S = 90  # imports and two pipelines on a busy 2-core machine
WAIT_S = 60  # a page action, a tiny 2-step request included
STEPS, NUM_IMAGES, SEED = 2, 3, 7
PROMPT = "a red circle"


def free_port() -> int:
    """A port nothing listens on now (the OS picks it; the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_server(proc: subprocess.Popen, url: str, log: Path) -> None:
    """Returns once `url` answers HTTP; fails with the server's output if it exits or stays silent."""
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"`clipcond serve` exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    pytest.fail(f"`clipcond serve` did not answer {url} in {SERVER_START_S} s:\n{log.read_text(errors='replace')}")


@dataclass
class Server:
    url: str
    output_dir: Path  # its --output-dir: a folder per request
    temp_dir: Path  # Gradio's copies of uploads and outputs


@pytest.fixture(scope="module")
def server(pipeline_run, unclip_runs, tmp_path_factory):
    """A `clipcond serve` subprocess on both decoders and the prior, killed after."""
    root = tmp_path_factory.mktemp("serve")
    output_dir, temp_dir, log = root / "requests", root / "gradio", root / "server.log"
    port = free_port()
    argv = [sys.executable, "-m", "clipcond", "serve", "--model", str(pipeline_run)]
    argv += ["--model", str(unclip_runs["decoder"]), "--prior", str(unclip_runs["prior"])]
    argv += ["--port", str(port), "--output-dir", str(output_dir), "--device", "cpu", "--dtype", "fp32"]
    # No telemetry (no network here), and Gradio's copies of uploads and outputs in the test's folder, not /tmp/gradio.
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(temp_dir)}
    env["PYTHONUNBUFFERED"] = "1"  # its output in the log even when it is killed
    # Started outside the source tree, so that `clipcond` is the installed package (with its mapped subpackages).
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_for_server(proc, url, log)
        yield Server(url, output_dir, temp_dir)
    finally:
        proc.kill()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser(server):
    """Headless Chromium on the served page (root in a container needs --no-sandbox; /dev/shm may be tiny)."""
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
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
        done = len(images) >= NUM_IMAGES and len(links) == NUM_IMAGES + 1
        return done and all(driver.execute_script("return arguments[0].complete", img) for img in images)

    WebDriverWait(page, WAIT_S).until(loaded)
    images = page.find_elements(By.CSS_SELECTOR, "#generate-gallery img")
    sizes = [page.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", i) for i in images]
    sample_size = json.loads((pipeline_run / "unet" / "config.json").read_text())["sample_size"]
    assert sizes == [[sample_size, sample_size]] * NUM_IMAGES

    # What the page offers to download: the PNGs, then images.jsonl.
    anchors = page.find_elements(By.CSS_SELECTOR, "#generate-files a[download]")
    links = {a.get_attribute("download"): a.get_attribute("href") for a in anchors}
    assert sorted(links) == [*(f"{k:05d}.png" for k in range(NUM_IMAGES)), "images.jsonl"]
    downloaded = download(links["images.jsonl"])
    (folder,) = server.output_dir.glob("*-generate")  # the request's own folder
    assert (folder / "images.jsonl").read_bytes() == downloaded
    records = read_jsonl(downloaded)
    command_dir = tmp_path / "command"
    argv = ["generate", "--model", str(pipeline_run), "--prompt", PROMPT, "--seed", str(SEED)]
    argv += ["--num-images", str(NUM_IMAGES), "--num-inference-steps", str(STEPS), "--output-dir", str(command_dir)]
    assert main([*argv, "--device", "cpu", "--dtype", "fp32"]) == 0
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
