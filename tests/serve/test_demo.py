"""The demo page end to end in headless Chromium (Debian's ``/usr/bin/chromium``, driven by
Playwright's Python package; no ``playwright install``): pick a query and a user, see the
ranked sentences with scores, accept and reject with one click, watch the list re-rank."""

from __future__ import annotations

import os
import shutil
import threading

import pytest

from streamml.serve.app import create_app
from tests.helpers import free_port, wait_until
from tests.serve.serve_helpers import serve_cfg

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def serve_in_thread(app):
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()

    def started():
        if not thread.is_alive():
            raise RuntimeError("uvicorn exited before it started")
        return server.started

    wait_until(started, "uvicorn to start", 60)
    return server, thread, f"http://127.0.0.1:{port}"


def launch(playwright, tmp_path):
    return playwright.chromium.launch_persistent_context(
        str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True,
        args=["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
        viewport={"width": 1000, "height": 760},
    )


def rows(page):
    """[(item, text, score)] of the shown list, top first."""
    out = []
    for li in page.query_selector_all("#items li"):
        score = float(li.query_selector(".score").inner_text().split()[0])
        out.append((int(li.get_attribute("data-item")), li.query_selector(".text").inner_text(), score))
    return out


def test_demo_page_ranks_and_reranks_on_one_click(served_models, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (apt-get install chromium); CI installs it")
    items_dir, tracking_uri, _ = served_models
    server, thread, url = serve_in_thread(create_app(serve_cfg(items_dir, tracking_uri,
                                                               overrides=["explore=greedy"])))
    try:
        with sync_api.sync_playwright() as p:
            browser = launch(p, tmp_path)
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_selector("#items li")
            assert page.eval_on_selector("#query", "s => [...s.options].map(o => o.value)") == ["topic_0", "topic_1", "topic_2"]
            page.select_option("#query", "topic_1")
            page.fill("#user", "browser-user")
            page.click("#rank")
            page.wait_for_function("document.querySelector('#status').textContent.includes('event')")
            before = rows(page)
            assert len(before) == 10 and all(text.startswith("topic 1 sentence") for _, text, _ in before)
            assert [s for *_, s in before] == sorted((s for *_, s in before), reverse=True)

            # accept the last shown sentence: it climbs; reject the top one: it drops
            item, text, score = before[-1]
            for _ in range(3):
                page.click(f"#items li[data-item='{item}'] .accept")
                page.wait_for_function("document.querySelector('#status').textContent.includes('accepted item')")
                page.wait_for_function("document.querySelector('#status').textContent.includes('event')")
            after = rows(page)
            position = [i for i, _, _ in after].index(item)
            assert position < len(before) - 1, f"accepted item {item} stayed at the bottom: {after}"
            assert dict((i, s) for i, _, s in after)[item] > score
            page.screenshot(path=str(tmp_path / "accepted.png"))

            top = after[0][0]
            page.click(f"#items li[data-item='{top}'] .reject")
            page.wait_for_function("document.querySelector('#status').textContent.includes('rejected item')")
            assert rows(page)[0][0] != top or rows(page)[0][2] < after[0][2]

            # a new user sees the head's order again; forgetting the user restores it too
            page.click("#forget")
            page.wait_for_function("document.querySelector('#status').textContent.includes('user forgotten')")
            assert [i for i, _, _ in rows(page)] == [i for i, _, _ in before]
            browser.close()
    finally:
        server.should_exit = True
        thread.join(30)


def test_demo_page_with_a_token_asks_for_it_then_works(served_models, tmp_path, monkeypatch):
    """With STREAMML_TOKEN set: a clear message instead of a dead end, a clear one for a wrong
    token, and with the right one the query list fills and the page ranks and rewards."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (apt-get install chromium); CI installs it")
    monkeypatch.setenv("STREAMML_TOKEN", "s3cret")
    items_dir, tracking_uri, _ = served_models
    server, thread, url = serve_in_thread(create_app(serve_cfg(items_dir, tracking_uri, overrides=["explore=greedy"])))
    status = "document.querySelector('#status')"
    try:
        with sync_api.sync_playwright() as p:
            browser = launch(p, tmp_path)
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_function(f"{status}.textContent.includes('needs a token')")
            assert page.get_attribute("#status", "class") == "error" and page.query_selector_all("#items li") == []

            page.fill("#token", "wrong")
            page.click("#rank")
            page.wait_for_function(f"{status}.textContent.includes('wrong token')")
            assert page.eval_on_selector("#query", "s => s.options.length") == 0

            page.fill("#token", "s3cret")
            page.click("#rank")
            page.wait_for_selector("#items li")
            page.wait_for_function(f"{status}.textContent.includes('event')")
            assert page.eval_on_selector("#query", "s => [...s.options].map(o => o.value)") == ["topic_0", "topic_1", "topic_2"]
            item = rows(page)[-1][0]
            page.click(f"#items li[data-item='{item}'] .accept")
            page.wait_for_function(f"{status}.textContent.includes('accepted item {item} (applied)')")
            page.click("#forget")
            page.wait_for_function(f"{status}.textContent.includes('user forgotten')")
            assert page.get_attribute("#status", "class") == ""
            browser.close()
    finally:
        server.should_exit = True
        thread.join(30)
