"""`ddpm ui` end to end in a real headless browser: the command started as a process on a free loopback port over
a tiny trained run, Debian's chromium driven by Selenium. Generate 4 images and check the files; the Runs tab's
loss plot; a path outside the roots and a bad upload refused in the page; Prepare in the Data tab; nothing
requested from anywhere but the page itself; a screenshot of each tab in pytest's tmp folder."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest
from conftest import ui_project
from PIL import Image

from ddpm_tf.generation import images_of
from ddpm_tf.images import read_png_metadata

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e '.[test]')")
pytest.importorskip("gradio", reason="needs the ui extra (pip install -e '.[ui]')")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

WAIT = 300  # seconds; generous for a loaded 2-core machine, never a measured time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return ui_project(tmp_path_factory.mktemp("uib"))


@pytest.fixture(scope="module")
def server(project):
    """The URL of `ddpm ui` serving the project, started as its own process."""
    port = free_port()
    log = project["root"] / "ui.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "ddpm_tf.cli", "ui", "--runs", str(project["runs"]),
                                    "--configs", str(project["configs"]), "--port", str(port)],
                                   stdout=out, stderr=subprocess.STDOUT, cwd=project["root"])
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + WAIT
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"ddpm ui did not start:\n{log.read_text(encoding='utf-8', errors='replace')}")
            time.sleep(0.5)
    assert f"ddpm ui: {url}" in log.read_text(encoding="utf-8")
    yield url
    process.terminate()
    process.wait(timeout=60)


@pytest.fixture(scope="module")
def browser(server):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1600", f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    driver.requested = set()  # every http(s)/ws URL the page asked for, from the performance log
    driver.get(server)
    yield driver
    driver.quit()


def requested(driver) -> set[str]:
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] in ("Network.requestWillBeSent", "Network.webSocketCreated"):
            url = message["params"].get("request", {}).get("url") or message["params"].get("url", "")
            if url.startswith(("http:", "https:", "ws:", "wss:")):
                driver.requested.add(url)
    return driver.requested


def wait(driver, condition, timeout=WAIT):
    return WebDriverWait(driver, timeout, poll_frequency=0.3).until(condition)


def open_tab(driver, name: str) -> None:
    for close in driver.find_elements(By.CSS_SELECTOR, ".toast-close"):  # the previous tab's messages
        close.click()
    tab = wait(driver, EC.element_to_be_clickable((By.XPATH, f"//button[@role='tab'][normalize-space()='{name}']")))
    tab.click()


def page_says(driver, text: str):
    return wait(driver, lambda d: text in d.find_element(By.TAG_NAME, "body").text)


def test_generate_four_images(browser, project, tmp_path_factory):
    shots = tmp_path_factory.getbasetemp()
    wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#gen-checkpoint input").get_attribute("value") == "4")
    wait(browser, EC.element_to_be_clickable((By.ID, "generate"))).click()
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img")) == 4)
    info = wait(browser, lambda d: d.find_element(By.ID, "gen-info").text)
    grid = project["runs"] / re.search(r"grid (\S+\.png)", info).group(1)  # shown relative to the runs folder
    images = images_of(grid)
    assert len(images) == 4 and grid.parent == project["run"] / "samples"
    for seed, path in enumerate(images):
        with Image.open(path) as im:
            assert im.size == (16, 16)  # the run's data.image_size
        meta = read_png_metadata(path)
        assert meta["ddpm_tf:seed"] == str(seed) and meta["ddpm_tf:step"] == "4"
    assert read_png_metadata(grid)["ddpm_tf:seeds"] == "0,1,2,3"
    browser.save_screenshot(str(shots / "ui-generate.png"))
    # "Reuse this seed": a click on the third image puts its seed in the seeds box.
    browser.find_elements(By.CSS_SELECTOR, "#gallery button.thumbnail-item, #gallery .thumbnail-item")[2].click()
    wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#gen-seeds input, #gen-seeds textarea")
                                  .get_attribute("value") == "2")


def test_runs_tab_shows_the_loss_plot(browser, tmp_path_factory):
    open_tab(browser, "Runs")
    wait(browser, lambda d: "tiny" in d.find_element(By.ID, "runs-table").text)
    plot = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#loss-plot canvas, #loss-plot svg.marks"))
    assert plot[0].size["width"] > 100
    wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#latest-preview img"))
    browser.save_screenshot(str(tmp_path_factory.getbasetemp() / "ui-runs.png"))


def test_a_path_outside_the_roots_and_a_bad_upload_are_refused(browser, server, project, tmp_path_factory):
    open_tab(browser, "img2img & interpolate")
    box = wait(browser, EC.visibility_of_element_located((By.CSS_SELECTOR, "#i2i-path input, #i2i-path textarea")))
    box.send_keys("/etc/passwd")
    browser.find_element(By.ID, "i2i-go").click()
    page_says(browser, "/etc/passwd is outside the folders this page may read")
    box.clear()
    fake = project["root"] / "holiday.png"
    fake.write_text("not an image at all", encoding="utf-8")
    browser.find_element(By.CSS_SELECTOR, "#i2i-upload input[type=file]").send_keys(str(fake))
    # Uploaded (not only listed): the file's link to the server's copy is there.
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#i2i-upload a[href*='holiday.png']"))
    browser.find_element(By.ID, "i2i-go").click()
    page_says(browser, "holiday.png: cannot use this image: not-an-image")  # its name, not Gradio's temporary copy
    browser.save_screenshot(str(tmp_path_factory.getbasetemp() / "ui-img2img.png"))
    # The file route serves nothing outside the roots either.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(server + "gradio_api/file=/etc/passwd", timeout=30)
    assert refused.value.code == 403


def test_train_and_data_tabs(browser, tmp_path_factory):
    open_tab(browser, "Train")
    wait(browser, EC.visibility_of_element_located((By.ID, "train-start")))
    browser.find_element(By.CSS_SELECTOR, "#train-name textarea").send_keys("tiny")
    page_says(browser, "not training · step 4 / 4 (done)")
    browser.save_screenshot(str(tmp_path_factory.getbasetemp() / "ui-train.png"))
    open_tab(browser, "Data")
    wait(browser, EC.element_to_be_clickable((By.ID, "data-go"))).click()
    wait(browser, lambda d: "prepared 8 files" in d.find_element(By.CSS_SELECTOR, "#data-summary textarea")
         .get_attribute("value"))
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#data-thumbs img")) == 8)
    assert "bright" in browser.find_element(By.CSS_SELECTOR, "#data-balance textarea").get_attribute("value")
    browser.save_screenshot(str(tmp_path_factory.getbasetemp() / "ui-data.png"))


def test_nothing_was_requested_from_elsewhere(browser, server):
    urls = requested(browser)
    assert any(u.startswith(server) for u in urls)
    assert not [u for u in urls if not u.startswith((server, server.replace("http:", "ws:")))]


def test_listen_without_a_password_is_refused_by_the_command(project):
    result = subprocess.run([sys.executable, "-m", "ddpm_tf.cli", "ui", "--runs", str(project["runs"]),
                             "--listen", "0.0.0.0"], capture_output=True, text=True, timeout=120,
                            env={**os.environ})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "Error: --listen 0.0.0.0: the page would be open to anyone who can reach this address (it starts "
        "trainings and reads your runs); add --auth USER:PASSWORD or --auth-file FILE"]
