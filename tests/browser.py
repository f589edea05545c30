"""Headless Debian Chromium driven by Selenium, as the UI tests and
scripts/screenshot.py use it: nothing downloaded, no usage statistics, its own
profile."""

import os

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def installed():
    """Whether Debian's chromium and chromium-driver are there."""
    return os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)


def chromium(profile, window_size="1280,900"):
    """A Selenium driver of headless Chromium with its profile in ``profile``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_AVOID_STATS"] = "true"  # Selenium: no usage statistics
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu",
                "--disable-background-networking", "--disable-component-update",
                "--no-first-run", "--disable-sync", "--disable-dev-shm-usage",
                f"--user-data-dir={profile}", f"--window-size={window_size}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
