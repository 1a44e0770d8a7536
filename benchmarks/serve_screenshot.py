"""The README's screenshot of `clipcond serve`: start the page on a demo folder, type a prompt into the Generate tab
in headless Chromium, wait for the images and save the window as a PNG.

    python benchmarks/serve_screenshot.py --demo demo --output docs/serve.png

Needs the `ui` extra, Selenium (the `dev` extra) and Debian's `chromium` + `chromium-driver`. The functions that
start the server and the browser are what tests/test_serve_browser.py drives the page with too.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(argv: list[str], port: int, log: Path, timeout: float = 120.0, gradio_temp: Path | None = None):
    """`clipcond serve ARGV --port PORT` in a subprocess until the page answers (its output in `log`); yields the
    URL and stops the server on the way out. A server that exits first fails with the end of its log. Gradio's
    telemetry is off (no network is assumed), and its copies of uploads and outputs go to `gradio_temp` if given.
    The server starts in the log's folder, outside any source tree: `clipcond` is the installed package."""
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    if gradio_temp is not None:
        env["GRADIO_TEMP_DIR"] = os.fspath(gradio_temp)
    command = [sys.executable, "-m", "clipcond", "serve", *argv, "--port", str(port)]
    with open(log, "w") as out:
        server = subprocess.Popen(command, cwd=Path(log).parent, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"clipcond serve exited with {server.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"clipcond serve did not answer in {timeout:.0f} s:\n{log.read_text()[-3000:]}"
                    ) from None
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def missing_browser() -> str | None:
    """Why headless Chromium cannot run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (the dev extra)"
    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    if missing:
        return f"{' and '.join(missing)} not found (Debian: apt-get install chromium chromium-driver)"
    return None


def chromium(width: int = 1280, height: int = 900):
    """A headless Chromium driven by Selenium (Debian's chromium and chromium-driver; root in a container needs
    --no-sandbox, and /dev/shm may be tiny)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def wait_for(driver, condition, timeout: float = 120.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)


def generate_on_page(driver, url: str, prompt: str, count: int, timeout: float = 300.0) -> list:
    """Open the page, type `prompt` into the Generate tab, press Generate and wait for `count` images: their
    elements."""
    from selenium.webdriver.common.by import By

    driver.get(url)
    box = wait_for(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#generate-prompt textarea"))
    box.send_keys(prompt)
    count_box = driver.find_element(By.CSS_SELECTOR, "#generate-count input")
    count_box.clear()
    count_box.send_keys(str(count))
    driver.find_element(By.ID, "generate-button").click()

    def drawn(d):
        images = d.find_elements(By.CSS_SELECTOR, "#generate-gallery img")
        loaded = [
            i for i in images if d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)
        ]
        return loaded if len(loaded) == count else False

    return wait_for(driver, drawn, timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", required=True, help="a finished `clipcond demo` folder")
    parser.add_argument("--output", default="docs/serve.png", help="the PNG to write (default docs/serve.png)")
    parser.add_argument("--prompt", default="a red circle", help="what to type (default 'a red circle')")
    parser.add_argument("--count", type=int, default=4, help="images to draw (default 4)")
    args = parser.parse_args(argv)
    reason = missing_browser()
    if reason:
        raise SystemExit(f"serve_screenshot: {reason}")
    with tempfile.TemporaryDirectory(prefix="clipcond-screenshot-") as tmp:
        serve_argv = ["--demo", args.demo, "--output-dir", str(Path(tmp) / "out")]
        with serving(serve_argv, free_port(), Path(tmp) / "serve.log") as url:
            driver = chromium()
            try:
                generate_on_page(driver, url, args.prompt, args.count)
                driver.execute_script("window.scrollTo(0, 0)")  # the button press scrolled the header away
                time.sleep(1.0)  # the gallery's fade-in
                Path(args.output).parent.mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(args.output)
            finally:
                driver.quit()
    print(f"serve_screenshot: {args.output} ({Path(args.output).stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
