"""The report as a user sees it: index.html opened in headless Chromium.

Checks that the page loads, every chart decodes (naturalWidth > 0) and the console has
no SEVERE entry (a broken data URI, a blocked external asset or a CSP violation all log
one). Needs Debian's chromium + chromium-driver: `make browser` installs them; without
them this test fails on purpose rather than skipping, so CI cannot pass it vacuously.
"""

from __future__ import annotations

import shutil

import pytest

from synthetic_results import EVIL, synthetic_results
from tasktune.eval.report import write_report

FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1280,2000",
]


def _browser_binaries() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.fail(
            "headless Chromium is not installed (need `chromium` and `chromedriver` on PATH): run `make browser` "
            "(apt-get install chromium chromium-driver)",
            pytrace=False,
        )
    return chromium, driver


@pytest.fixture
def driver(tmp_path):
    chromium, chromedriver = _browser_binaries()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: run `make test` (installs .[test]) or `pip install selenium`", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    drv.set_page_load_timeout(30)
    yield drv
    drv.quit()


def test_report_renders_in_headless_chromium(driver, tmp_path):
    paths = write_report(synthetic_results(seed=2), tmp_path / "run", n_resamples=200)
    driver.get(paths["html"].resolve().as_uri())
    assert driver.execute_script("return document.readyState") == "complete"
    assert driver.title.startswith("tasktune report")
    sections = driver.execute_script("return Array.from(document.querySelectorAll('section')).map(s => s.id)")
    assert sections == ["verdict", "metrics", "curves", "transfer", "confusion", "errors", "costs", "forgetting", "environment"]

    images = driver.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])"
    )
    assert len(images) >= 14
    broken = [alt for alt, complete, w, h in images if not (complete and w > 0 and h > 0)]
    assert not broken, f"images that did not decode: {broken}"

    # user text is shown as text, never run: the hostile string is visible and no script exists
    assert driver.execute_script("return document.scripts.length") == 0
    assert EVIL.split(" &")[0] in driver.find_element("id", "errors").text

    severe = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert not severe, f"console errors: {severe}"
