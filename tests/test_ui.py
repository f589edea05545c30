"""The MLflow UI, in a real browser: a tracked run's page shows the gap/ and
eval_train/ metrics with their logged values, and the report artifact renders
in the artifact browser with its diagnosis, sentence and charts.

Headless Debian Chromium driven by Selenium through Debian's chromedriver; no
browser is downloaded, the profile lives in the test's tmp_path, and the only
address it opens is the session's ``mlflow server`` on 127.0.0.1. Screenshots
(``run_page.png``, ``report.png``) are saved in tmp_path.
"""

import os

import keras
import mlflow
import pytest
from mlflow.tracking import MlflowClient

import gaptrack
from builders import blobs, mlp
from gaptrack.keys import REPORT_DIR

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT = 60


@pytest.fixture
def browser(tmp_path, monkeypatch):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER})")
    monkeypatch.setenv("SE_AVOID_STATS", "true")  # Selenium: no usage statistics
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu",
                "--disable-background-networking", "--disable-component-update",
                "--no-first-run", "--disable-sync", "--disable-dev-shm-usage",
                f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1600,1200"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_run_page_shows_gap_metrics_and_the_report(server_uri, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    keras.utils.set_random_seed(0)
    x, y = blobs(96)
    tracker = gaptrack.GapTracker((x, y), batch_size=32)
    mlp(bn=True, dropout=0.2).fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[tracker])
    run = MlflowClient().get_run(tracker.run_id)
    run_url = f"{server_uri}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"

    def cell(text):
        """The first displayed element whose own text is exactly ``text``."""
        xpath = f"//*[normalize-space(text())='{text}']"
        found = [e for e in browser.find_elements(By.XPATH, xpath) if e.is_displayed()]
        return found[0] if found else None

    # the run's overview lists the metrics with the values logged
    browser.get(run_url)
    keys = ["gap/loss", "gap/loss/drift", "gap/loss/mode", "gap/loss/bn_ema", "eval_train/loss",
            "eval_train/accuracy"]
    WebDriverWait(browser, WAIT).until(lambda d: all(cell(k) for k in keys))
    for key in keys:
        row = cell(key).find_element(By.XPATH, "./ancestor::*[@role='row'][1]")
        shown_key, shown_value = row.text.split()
        assert shown_key == key and float(shown_value) == run.data.metrics[key]
    cause = run.data.tags["gaptrack.diagnosis"]
    tag = cell("gaptrack.diagnosis").find_element(By.XPATH, "..")
    assert tag.is_displayed() and tag.text.replace("\n", "").endswith(f": {cause}")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", cell("gap/loss"))
    browser.save_screenshot(str(tmp_path / "run_page.png"))

    # the artifact browser lists the report and renders the HTML page
    browser.get(f"{run_url}/artifacts/{REPORT_DIR}/report.html")
    WebDriverWait(browser, WAIT).until(
        lambda d: all(cell(name) for name in ("report.html", "report.md", "decomposition.png",
                                              "bn_staleness.png"))
        and d.find_elements(By.TAG_NAME, "iframe"))
    frame = browser.find_element(By.TAG_NAME, "iframe")
    assert frame.is_displayed() and frame.size["height"] > 300
    browser.switch_to.frame(frame)
    WebDriverWait(browser, WAIT).until(lambda d: d.find_elements(By.CLASS_NAME, "sentence"))
    shown = browser.find_element(By.CLASS_NAME, "diagnosis").text
    assert shown.startswith(f"Diagnosis: {cause}")
    markdown = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/{REPORT_DIR}/report.md")
    sentence = markdown.split("\n\n")[2]
    assert sentence.startswith("At epoch 1, fit() reported loss")
    assert browser.find_element(By.CLASS_NAME, "sentence").text == sentence
    images = browser.find_elements(By.TAG_NAME, "img")
    assert len(images) == 2
    for image in images:  # decoded, not broken
        assert browser.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth", image) >= 600
    browser.switch_to.default_content()
    browser.save_screenshot(str(tmp_path / "report.png"))
