"""The pairing approval page in a real headless Chromium (Debian's ``chromium``,
driven by Selenium through ``chromium-driver``), phone-sized, with JavaScript
off: a user approves and denies through the page, a forged form is refused, and
every answer carries the headers that keep it from being framed or cached.

Screenshots go to ``$PAIRING_SCREENSHOTS`` if set (CI's output folder), else to
the test's own temporary folder.
"""

from __future__ import annotations

import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from login_token_module.pairing import PAGE_PATH, POLL_PATH, START_PATH
from tests.helpers import PASSWORD, ChildServer, Launcher, homeserver_yaml, register, sync_call, write_config

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed"
    for path in (CHROMIUM, CHROMEDRIVER):
        if shutil.which(path) is None:
            return f"{path} is missing (Debian's chromium and chromium-driver)"
    return None


@pytest.fixture
def browser() -> Iterator[Any]:
    missing = _browser_missing()
    if missing is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the browser test is required under CI: {missing}", pytrace=False)
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=390,844"):
        options.add_argument(argument)
    # The page must work without JavaScript: the browser runs none.
    options.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("PAIRING_SCREENSHOTS", tmp_path / "screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def server(tmp_path: Path, launch: Launcher) -> ChildServer:
    raw = homeserver_yaml(
        tmp_path,
        {"store": {"type": "sqlite", "path": "tokens.db"}, "pairing": {"enabled": True, "interval_ms": 10}},
    )
    path = write_config(tmp_path, raw)
    register(path)
    return launch(path)


def start(server: ChildServer, name: str) -> dict[str, Any]:
    code, started = sync_call(server.base_url, "POST", START_PATH, {"initial_device_display_name": name})
    assert code == 200, started
    return started


def poll(server: ChildServer, pairing_id: str) -> tuple[int, dict[str, Any]]:
    time.sleep(0.05)  # no faster than interval_ms (10 ms)
    return sync_call(server.base_url, "POST", POLL_PATH, {"pairing_id": pairing_id})


def submit(driver: Any, button: Any) -> None:
    """Press ``button`` and wait until the next page has replaced this one."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    page = driver.find_element(By.TAG_NAME, "html")
    button.click()

    def left(_: Any) -> bool:
        # Selenium's staleness_of waits for StaleElementReferenceException only; in the
        # middle of the navigation Chromium may instead report the old page's node as
        # "not belonging to the document" (a plain WebDriverException). Either: it is gone.
        try:
            page.is_enabled()
        except WebDriverException:
            return True
        return False

    WebDriverWait(driver, 20).until(left)
    WebDriverWait(driver, 20).until(lambda d: d.execute_script("return document.readyState") == "complete")


def sign_in_and_press(driver: Any, button: str, password: str = PASSWORD) -> None:
    from selenium.webdriver.common.by import By

    user = driver.find_element(By.ID, "user")
    user.clear()
    user.send_keys("@alice:test.local")
    driver.find_element(By.ID, "password").send_keys(password)
    submit(driver, driver.find_element(By.ID, button))


def test_a_user_approves_through_the_page(server: ChildServer, browser: Any, screenshots: Path) -> None:
    from selenium.webdriver.common.by import By

    started = start(server, "Living-room TV")
    browser.get(started["verification_uri_complete"])
    shown = browser.find_element(By.ID, "pairing").text
    assert started["user_code"] in shown and "Living-room TV" in shown and "127.0.0.1" in shown
    assert "in your hands" in browser.page_source
    browser.save_screenshot(str(screenshots / "pairing-page.png"))

    sign_in_and_press(browser, "approve", password="wrong")
    assert "Wrong user id or password" in browser.find_element(By.ID, "message").text
    assert poll(server, started["pairing_id"]) == (200, {"status": "pending"})

    sign_in_and_press(browser, "approve")
    message = browser.find_element(By.ID, "message").text
    assert message.startswith("Approved.") and "Living-room TV" in message, message
    browser.save_screenshot(str(screenshots / "pairing-approved.png"))
    code, delivered = poll(server, started["pairing_id"])
    assert code == 200 and delivered["status"] == "approved", delivered
    login = {"type": "m.login.token", "token": delivered["login_token"]}
    assert sync_call(server.base_url, "POST", "/_matrix/client/v3/login", login)[0] == 200


def test_a_user_enters_the_code_and_denies_through_the_page(
    server: ChildServer, browser: Any, screenshots: Path
) -> None:
    from selenium.webdriver.common.by import By

    started = start(server, "Unknown box")
    browser.get(started["verification_uri"])
    browser.find_element(By.ID, "code").send_keys(started["user_code"].replace("-", "").lower())
    submit(browser, browser.find_element(By.CSS_SELECTOR, "button[type=submit]"))
    assert "Unknown box" in browser.find_element(By.ID, "pairing").text
    sign_in_and_press(browser, "deny")
    assert browser.find_element(By.ID, "message").text.startswith("Denied.")
    browser.save_screenshot(str(screenshots / "pairing-denied.png"))
    assert poll(server, started["pairing_id"]) == (200, {"status": "denied"})

    # A wrong code is said plainly.
    browser.get(server.base_url + PAGE_PATH + "?code=BBBB-BBBB")
    assert "No device is waiting with this code" in browser.find_element(By.ID, "message").text


def _post_form(url: str, fields: dict[str, str], cookie: str | None = None) -> tuple[int, str, Any]:
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if cookie is not None:
        headers["Cookie"] = cookie
    request = urllib.request.Request(
        url, data=urllib.parse.urlencode(fields).encode(), headers=headers, method="POST"
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=30) as response:
            return response.status, response.read().decode(), response.headers
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(), error.headers


def test_a_forged_form_is_refused_and_the_headers_keep_the_page_private(server: ChildServer) -> None:
    started = start(server, "TV")
    page = server.base_url + PAGE_PATH
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(page + "?code=" + started["user_code"], timeout=30) as response:
        headers = response.headers
        body = response.read().decode()
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert "script-src" not in headers["Content-Security-Policy"]  # default-src 'none': no script at all
    assert headers["Cache-Control"] == "no-store"
    assert headers["X-Frame-Options"] == "DENY"
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "samesite=strict" in cookie.lower()
    assert "<script" not in body and started["pairing_id"] not in body

    fields = {"code": started["user_code"], "user": "alice", "password": PASSWORD, "action": "approve"}
    # No token, a made-up token, or a token without its cookie (a cross-site form): refused.
    for form, with_cookie in (
        (fields, None),
        ({**fields, "csrf_token": "x" * 43}, cookie.split(";")[0]),
        ({**fields, "csrf_token": cookie.split(";")[0].split("=", 1)[1]}, None),
    ):
        code, text, answer_headers = _post_form(page, form, with_cookie)
        assert code == 403 and "expired or did not come from this page" in text, (code, text)
        assert answer_headers["Cache-Control"] == "no-store"
    assert poll(server, started["pairing_id"]) == (200, {"status": "pending"})

    # Hostile fields get a page saying so, never a 500, and nothing is decided.
    token = cookie.split(";")[0].split("=", 1)[1]
    for form in (
        {**fields, "csrf_token": token, "action": "steal"},
        {**fields, "csrf_token": token, "password": "x" * 5000},
    ):
        code, text, _ = _post_form(page, form, cookie.split(";")[0])
        assert code == 400, (code, text)
    code, text, _ = _post_form(
        page, {**fields, "csrf_token": token, "user": "@alice:elsewhere"}, cookie.split(";")[0]
    )
    assert code == 403 and "Wrong user id or password" in text
    assert poll(server, started["pairing_id"]) == (200, {"status": "pending"})

    # With the cookie and its token, the same form approves.
    code, text, _ = _post_form(page, {**fields, "csrf_token": token}, cookie.split(";")[0])
    assert code == 200 and "Approved." in text, text
    assert poll(server, started["pairing_id"])[1]["status"] == "approved"
