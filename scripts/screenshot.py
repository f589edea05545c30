"""Regenerate the README's picture: a tracked run's page in the MLflow UI.

Trains a small BatchNormalization MLP on scikit-learn's ``digits`` at a large
batch size (stale moving averages: the ``bn_ema`` case) with ``GapTracker``,
logging to a temporary ``mlflow server`` on 127.0.0.1, then opens the run's
Overview at ``?workflowType=machine_learning`` in headless Debian Chromium
(Selenium with Debian's chromedriver, as tests/test_ui.py drives it) and saves
the page as ``docs/images/run_page.png``::

    python scripts/screenshot.py [--output docs/images/run_page.png]

Nothing is downloaded; the server, its store and the browser profile live in a
temporary folder removed at the end.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from _server import start_server, stop_server  # noqa: E402
from browser import CHROMEDRIVER, CHROMIUM, chromium, installed  # noqa: E402

DESCRIPTION = "//*[@data-testid='note-editor-preview-content']"
ASSISTANT_CLOSE = ("//*[normalize-space(text())='MLflow Assistant']/ancestor::*"
                   "[.//button][1]//button[contains(@aria-label, 'lose')]")


def tracked_run(tracking_uri):
    """A 4-epoch run of a 6-layer BN MLP on digits at batch 512; its (experiment, run) ids."""
    import keras
    import mlflow
    from sklearn.datasets import load_digits

    import gaptrack

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    keras.utils.set_random_seed(0)
    layers = [keras.Input((64,))]
    for _ in range(6):
        layers += [keras.layers.Dense(64, activation="relu"), keras.layers.BatchNormalization()]
    model = keras.Sequential(layers + [keras.layers.Dense(10, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.set_experiment("gaptrack-screenshot")
    with mlflow.start_run(run_name="deep_mlp bn=1 batch_size=512") as run:
        model.fit(x, y, batch_size=512, epochs=4, verbose=0,
                  callbacks=[gaptrack.GapTracker((x, y), batch_size=512)])
    return experiment.experiment_id, run.info.run_id


def screenshot(url, output, profile):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium(profile)
    try:
        driver.get(url)
        WebDriverWait(driver, 90).until(lambda d: d.find_elements(By.XPATH, DESCRIPTION))
        toggle = driver.find_elements(By.CSS_SELECTOR, "[aria-label='Expand description']")
        if toggle:  # "Show more": the headline's table and remedy too
            toggle[0].click()
        for button in driver.find_elements(By.XPATH, ASSISTANT_CLOSE):
            button.click()  # the assistant's side panel, which takes a third of the page
        heading = driver.find_element(By.XPATH, "//h4[normalize-space(text())='Description']")
        driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", heading)
        time.sleep(2)  # charts and fonts settle
        output.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(output))
    finally:
        driver.quit()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "images" / "run_page.png")
    args = parser.parse_args()
    if not installed():
        sys.exit(f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER})")
    with tempfile.TemporaryDirectory(prefix="gaptrack-shot-") as tmp:
        tmp = Path(tmp)
        os.environ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        os.environ["GAPTRACK_SPOOL_DIR"] = str(tmp / "spool")
        server, url = start_server(tmp, f"sqlite:///{tmp / 'mlflow.db'}")
        try:
            experiment_id, run_id = tracked_run(url)
            page = f"{url}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
            screenshot(page, args.output, tmp / "chromium-profile")
        finally:
            stop_server(server)
    print(args.output)


if __name__ == "__main__":
    main()
