"""The MLflow UI, in a real browser: a tracked run's page shows the gap/ and
eval_train/ metrics with their logged values, and the report artifact renders
in the artifact browser with its diagnosis, sentence and charts; a grid that the
project's ``sweep`` ran opens, at the address the entry points print, on its
runs by name, MLflow's comparison of two of them shows ``gap_final/loss``, and
the parent's ranking artifact shows as a table. A BN model's run page opens on
the answer: the Overview shows the report's headline as the run's description,
the Model metrics tab starts with the ``eval_train``, ``fit`` and ``gap`` sections
and holds BN staleness in two sections (none per layer), and the decomposition's
step images show in an image chart whose slider steps through the epochs.

Headless Debian Chromium driven by Selenium through Debian's chromedriver; no
browser is downloaded, the profile lives in the test's tmp_path, and the only
address it opens is the session's ``mlflow server`` on 127.0.0.1. Screenshots
(``run_page.png``, ``report.png``, ``experiment.png``, ``compare.png``,
``ranking_table.png``, ``overview_description.png``, ``model_metrics.png``,
``model_metrics_sections.png``, ``decomposition_step0.png``,
``decomposition_step1.png``) are saved in tmp_path; the run page's also in
``/tmp/ui-shots``.
"""

import json
import os
import urllib.parse
from pathlib import Path

import keras
import mlflow
import pytest
from mlflow.tracking import MlflowClient

import gaptrack
from browser import CHROMEDRIVER, CHROMIUM, chromium, installed
from builders import blobs, mlp
from gaptrack.keys import REPORT_DIR

WAIT = 60


@pytest.fixture
def browser(tmp_path):
    if not installed():
        pytest.skip(f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER})")
    driver = chromium(tmp_path / "chromium-profile", "1600,1200")
    try:
        yield driver
    finally:
        driver.quit()


def _cell(browser, text):
    """The first displayed element whose own text is exactly ``text``."""
    from selenium.webdriver.common.by import By

    found = [e for e in browser.find_elements(By.XPATH, f"//*[normalize-space(text())='{text}']")
             if e.is_displayed()]
    return found[0] if found else None


def test_run_page_shows_gap_metrics_and_the_report(server_uri, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    keras.utils.set_random_seed(0)
    x, y = blobs(96)
    tracker = gaptrack.GapTracker((x, y), batch_size=32)
    mlp(bn=True, dropout=0.2).fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[tracker])
    run = MlflowClient().get_run(tracker.run_id)
    run_url = f"{server_uri}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"

    # the run's overview lists the metrics with the values logged
    browser.get(run_url)
    keys = ["gap/loss", "gap/loss/drift", "gap/loss/mode", "gap/loss/bn_ema", "eval_train/loss",
            "eval_train/accuracy"]
    WebDriverWait(browser, WAIT).until(lambda d: all(_cell(d, k) for k in keys))
    for key in keys:
        row = _cell(browser, key).find_element(By.XPATH, "./ancestor::*[@role='row'][1]")
        shown_key, shown_value = row.text.split()
        assert shown_key == key and float(shown_value) == run.data.metrics[key]
    cause = run.data.tags["gaptrack.diagnosis"]
    tag = _cell(browser, "gaptrack.diagnosis").find_element(By.XPATH, "..")
    assert tag.is_displayed() and tag.text.replace("\n", "").endswith(f": {cause}")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})",
                           _cell(browser, "gap/loss"))
    browser.save_screenshot(str(tmp_path / "run_page.png"))

    # the artifact browser lists the report and renders the HTML page
    browser.get(f"{run_url}/artifacts/{REPORT_DIR}/report.html")
    WebDriverWait(browser, WAIT).until(
        lambda d: all(_cell(d, name) for name in ("report.html", "report.md", "decomposition.png",
                                                  "bn_staleness.png"))
        and d.find_elements(By.TAG_NAME, "iframe"))
    frame = browser.find_element(By.TAG_NAME, "iframe")
    assert frame.is_displayed() and frame.size["height"] > 300
    browser.switch_to.frame(frame)
    WebDriverWait(browser, WAIT).until(lambda d: d.find_elements(By.CLASS_NAME, "sentence"))
    shown = browser.find_element(By.CLASS_NAME, "diagnosis").text
    assert shown.startswith(f"gaptrack diagnosis: {cause}")
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


#: The texts shown beside a key in a section (Metrics...) of MLflow's run
#: comparison: its key column and value columns are separate virtualized grids
#: whose cells of one row share a ``top``. (Scrolled from a script, the grids
#: fall out of step, so the screenshot shows the section's first rows.)
_VALUES_BESIDE_KEY = """
const cell = arguments[0].closest('.ReactVirtualized__Grid__innerScrollContainer > *');
const section = cell.closest('.du-bois-light-collapse-content-box');
return [...section.querySelectorAll('.ReactVirtualized__Grid__innerScrollContainer > *')]
    .filter(c => c !== cell && c.style.top === cell.style.top && c.textContent.trim())
    .map(c => c.textContent.trim());
"""

GAP_FINAL = "//a[normalize-space(text())='gap_final/loss']"


def test_a_sweep_opens_on_its_runs_and_mlflow_compares_their_gap(server_uri, browser,
                                                                 tmp_path):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from projects import scenario
    from projects.experiment import CUSTOM_MODEL_DEVELOPMENT, KIND_TAG, runs_url
    from projects.params import pairs, parse
    from projects.sweep import RANKING_TABLE, parse_grid, run_grid

    experiment_id = mlflow.set_experiment("ui-sweep").experiment_id
    params = scenario("dropout").PARAMS
    config, _ = parse(pairs(["--epochs", "1", "--samples", "60"]), params, "dropout")
    parent_id, _ = run_grid("sweep", "dropout", config, parse_grid("dropout=0.2,0.6", params,
                                                                   "dropout"), "loss", {})
    assert MlflowClient().get_experiment(experiment_id).tags[KIND_TAG] == \
        CUSTOM_MODEL_DEVELOPMENT
    children = {r.info.run_name: r for r in MlflowClient().search_runs(
        [experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")}
    assert sorted(children) == ["dropout dropout=0.2", "dropout dropout=0.6"]

    # the address the entry points print opens on the runs table, the parent by name
    browser.get(runs_url(experiment_id, server_uri))
    WebDriverWait(browser, WAIT).until(lambda d: _cell(d, "sweep: dropout dropout"))
    assert "Token Usage" not in browser.find_element(By.TAG_NAME, "body").text
    browser.find_element(  # unfold the parent: its children, by name
        By.XPATH, "//button[contains(@data-component-id, 'runnamecellrenderer')]").click()
    WebDriverWait(browser, WAIT).until(lambda d: all(_cell(d, name) for name in children))
    browser.save_screenshot(str(tmp_path / "experiment.png"))

    # select the two children, then Compare
    for name in children:
        row = _cell(browser, name).find_element(By.XPATH, "./ancestor::*[@role='row'][1]")
        index = row.get_attribute("row-index")
        browser.find_element(By.XPATH, f"//*[@role='row' and @row-index='{index}']"
                                       "//input[@type='checkbox']").click()
    next(b for b in browser.find_elements(By.TAG_NAME, "button")
         if b.text.strip() == "Compare").click()
    WebDriverWait(browser, WAIT).until(lambda d: d.find_elements(By.XPATH, GAP_FINAL))

    def values_beside_key(d):
        values = d.execute_script(_VALUES_BESIDE_KEY, d.find_element(By.XPATH, GAP_FINAL))
        return len(values) == 2 and values

    shown = WebDriverWait(browser, WAIT, ignored_exceptions=[StaleElementReferenceException]
                          ).until(values_beside_key)
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})",
                           browser.find_element(By.XPATH, "//*[text()='Metrics']"))
    browser.save_screenshot(str(tmp_path / "compare.png"))
    compared = json.loads(urllib.parse.unquote(
        browser.current_url.split("runs=")[1].split("&")[0]))  # run ids, in column order
    by_id = {r.info.run_id: r for r in children.values()}
    assert sorted(compared) == sorted(by_id)
    # the value columns, in the compared runs' order, rounded to 3 decimals
    assert [float(v) for v in shown] == pytest.approx(
        [by_id[i].data.metrics["gap_final/loss"] for i in compared], abs=5e-4)

    # the parent's ranking.json, shown as a table: the children in rank order
    browser.get(f"{server_uri}/#/experiments/{experiment_id}/runs/{parent_id}/artifacts/"
                f"{RANKING_TABLE}")
    WebDriverWait(browser, WAIT).until(lambda d: _cell(d, "View as table")
                                       and _cell(d, "dropout dropout=0.6"))
    ranked = sorted(children, key=lambda n: -abs(children[n].data.metrics["gap_final/loss"]))
    names = [e for e in browser.find_elements(By.XPATH, "//*[@role='cell' or self::td]")
             if e.text in children]
    assert [e.text for e in names] == ranked
    browser.save_screenshot(str(tmp_path / "ranking_table.png"))


#: The run's description on its Overview: the markdown note, rendered.
DESCRIPTION = ("//h4[normalize-space(text())='Description']/following-sibling::*"
               "//*[@data-testid='note-editor-preview-content']")
_PARAGRAPHS = "return [...arguments[0].querySelectorAll('p')].map(" \
              "p => p.textContent.replace(/\\s+/g, ' ').trim());"

SECTION_HEADER = "[data-testid='experiment-view-compare-runs-section-header']"
IMAGE_CARD = ("//*[@data-testid='experiment-view-compare-runs-card']"
              "[.//h4[@title='gaptrack.decomposition']]")


def _shot(browser, tmp_path, name):
    import shutil

    browser.save_screenshot(str(tmp_path / name))
    os.makedirs("/tmp/ui-shots", exist_ok=True)
    shutil.copy(tmp_path / name, os.path.join("/tmp/ui-shots", name))


def test_the_run_page_opens_on_the_answer(server_uri, browser, tmp_path):
    """The description, the metric sections and the step images of a BN model."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    keras.utils.set_random_seed(0)
    x, y = blobs(96)
    tracker = gaptrack.GapTracker((x, y), batch_size=32)
    model = mlp(bn=True, depth=3)
    model.fit(x, y, batch_size=32, epochs=3, verbose=0, callbacks=[tracker])
    run = MlflowClient().get_run(tracker.run_id)
    run_url = f"{server_uri}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    note = run.data.tags["mlflow.note.content"]
    markdown = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/{REPORT_DIR}/report.md")
    sentence = markdown.split("\n\n")[2]
    assert sentence.startswith("At epoch 2, fit() reported loss") and sentence in note
    layers = [l.name for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert len(layers) == 3

    # 1. the Overview shows the description, the report's sentence in it
    browser.get(run_url)
    box = WebDriverWait(browser, WAIT).until(lambda d: d.find_elements(By.XPATH, DESCRIPTION))[0]
    paragraphs = browser.execute_script(_PARAGRAPHS, box)
    assert paragraphs[0] == f"gaptrack diagnosis: {run.data.tags['gaptrack.diagnosis']}"
    assert " ".join(sentence.split()) in paragraphs
    assert paragraphs[-1].startswith("What to do:")
    toggle = browser.find_elements(By.CSS_SELECTOR, "[aria-label='Expand description']")
    if toggle:  # "Show more": the whole headline, table and remedy too
        toggle[0].click()
    WebDriverWait(browser, WAIT).until(lambda d: all(
        c.is_displayed() for c in box.find_elements(By.XPATH, ".//td[text()='loss'] | .//p")))
    shown = box.find_element(By.XPATH, ".//p[starts-with(normalize-space(.), 'At epoch 2')]")
    assert " ".join(shown.text.split()) == " ".join(sentence.split())
    browser.execute_script("arguments[0].scrollIntoView({block: 'start'})",
                           box.find_element(By.XPATH, "ancestor::*[h4][1]"))
    _shot(browser, tmp_path, "overview_description.png")

    # 2. Model metrics: eval_train, fit, gap first; staleness in two sections after gap
    browser.get(f"{run_url}/model-metrics")

    def sections(d):
        titles = [h.text.split("\n")[0].strip()
                  for h in d.find_elements(By.CSS_SELECTOR, SECTION_HEADER)]
        return "staleness/var" in titles and titles

    titles = WebDriverWait(browser, WAIT, ignored_exceptions=[StaleElementReferenceException]
                           ).until(sections)
    assert titles[:3] == ["eval_train", "fit", "gap"], titles
    assert titles.index("gap") < titles.index("staleness/mean") < titles.index("staleness/var")
    assert not [t for t in titles if any(layer in t for layer in layers) or t.startswith("bn")]
    WebDriverWait(browser, WAIT).until(  # the first section's two charts drawn
        lambda d: len(d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot .main-svg")) >= 2)
    _shot(browser, tmp_path, "model_metrics.png")

    # 3. the decomposition's image chart, with a step slider over the 3 epochs
    def image_card(d):  # a section's cards are drawn once it is scrolled into view
        d.execute_script("arguments[0].scrollIntoView({block: 'start'})",
                         d.find_elements(By.CSS_SELECTOR, SECTION_HEADER)[-1])
        return d.find_elements(By.XPATH, IMAGE_CARD)

    card = WebDriverWait(browser, WAIT, ignored_exceptions=[StaleElementReferenceException]
                         ).until(image_card)[0]
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", card)

    def stored(step):
        """The base64 of the step's PNG and of its preview, as logged."""
        import base64

        names = [f.path for f in MlflowClient().list_artifacts(run.info.run_id, "images")
                 if f.path.startswith(f"images/gaptrack.decomposition+step+{step}+")]
        return {base64.b64encode(Path(mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path=name, dst_path=str(tmp_path))).read_bytes()
        ).decode("ascii") for name in names}

    logged = {step: stored(step) for step in (0, 1)}
    assert all(len(images) == 2 for images in logged.values())

    def image(d, step):
        """The card's image at ``step``, once it is loaded and decoded: its address
        names the file, or (MLflow 3.18) it is a blob holding the step's bytes."""
        found = d.find_elements(By.XPATH, f"{IMAGE_CARD}//img")
        src = found[0].get_attribute("src") if found else ""
        decoded = found and d.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth", found[0])
        if not decoded:
            return False
        if src.startswith("blob:"):
            shown = d.execute_async_script(
                "const done = arguments[arguments.length - 1];"
                "fetch(arguments[0]).then(r => r.arrayBuffer()).then(b => {"
                " let s = ''; for (const c of new Uint8Array(b)) s += String.fromCharCode(c);"
                " done(btoa(s)); }).catch(() => done(null));", src)
            return shown in logged[step] and shown
        return urllib.parse.quote(f"gaptrack.decomposition+step+{step}+") in src and src

    first = WebDriverWait(browser, WAIT).until(lambda d: image(d, 0))
    slider = browser.find_element(By.XPATH, f"{IMAGE_CARD}//*[@role='slider']")
    assert (slider.get_attribute("aria-valuemin"), slider.get_attribute("aria-valuemax"),
            slider.get_attribute("aria-valuenow")) == ("0", "2", "0")
    _shot(browser, tmp_path, "decomposition_step0.png")
    slider.send_keys(Keys.ARROW_RIGHT)
    second = WebDriverWait(browser, WAIT).until(lambda d: image(d, 1))
    assert second != first
    assert browser.find_element(By.XPATH, f"{IMAGE_CARD}//*[@role='slider']"
                                ).get_attribute("aria-valuenow") == "1"
    _shot(browser, tmp_path, "decomposition_step1.png")

    # the sections folded: their order at a glance
    for header in browser.find_elements(By.XPATH, "//*[@role='button' and @aria-expanded='true']"
                                                  "[.//*[@data-testid='experiment-view-compare-"
                                                  "runs-section-header']]"):
        browser.execute_script("arguments[0].click()", header)
    WebDriverWait(browser, WAIT).until(lambda d: not d.find_elements(
        By.CSS_SELECTOR, "[data-testid='experiment-view-compare-runs-card']"))
    browser.execute_script("arguments[0].scrollIntoView({block: 'start'})",
                           browser.find_elements(By.CSS_SELECTOR, SECTION_HEADER)[0])
    _shot(browser, tmp_path, "model_metrics_sections.png")
