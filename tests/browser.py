"""Headless Chromium for page tests and the HTML bench: network cut off, so a page can only use what it carries
(or, for `bpfprof view`'s pages, loopback and nothing else)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1000",
                  # Every request that is not a file: URL goes to a closed port (no network at all).
                  "--proxy-server=http://127.0.0.1:9")
NO_LOOPBACK = "--proxy-bypass-list=<-loopback>"  # loopback through the dead proxy too


@contextlib.contextmanager
def offline_chromium(tmp_dir: str | None = None, loopback: bool = False) -> Iterator[object]:
    """A selenium Chrome driver whose network is off (a dead proxy, and DevTools' offline emulation).

    `loopback`: 127.0.0.1 still answers (Chromium's own bypass of the proxy; no offline emulation), for
    pages a local server (`bpfprof view`) serves.

    AssertionError when chromium or chromium-driver is missing: callers fail, never skip.
    """
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        raise AssertionError("chromium and chromium-driver are not installed (packaging/setup.sh installs them)")
    from selenium import webdriver  # noqa: PLC0415
    from selenium.webdriver.chrome.service import Service  # noqa: PLC0415

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    with tempfile.TemporaryDirectory(dir=tmp_dir) as profile_dir:
        for flag in (*CHROMIUM_FLAGS, *(() if loopback else (NO_LOOPBACK,)), f"--user-data-dir={profile_dir}"):
            opts.add_argument(flag)
        driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
        try:
            driver.set_page_load_timeout(60)
            if not loopback:
                driver.execute_cdp_cmd("Network.enable", {})
                driver.execute_cdp_cmd("Network.emulateNetworkConditions", {
                    "offline": True, "latency": 0, "downloadThroughput": 0, "uploadThroughput": 0})
            yield driver
        finally:
            driver.quit()
