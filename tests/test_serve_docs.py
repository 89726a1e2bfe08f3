"""/docs and /redoc in headless Chromium against a real server: the OpenAPI 3.1 schema renders (the
operations list is on the page, not Swagger UI's "Unable to render this definition"), a request made
from the docs page works, the page shows the curl form that keeps `;` in labels, and neither page
loads anything from outside the server (works offline)."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect, sync_playwright
from serve_helpers import CHROMIUM, CHROMIUM_FLAGS as FLAGS
from serve_helpers import server  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow  # a real server process and chromium



@pytest.fixture()
def browser_page(server):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page()
        page.outside, page.fetched_outside, page.errors = [], [], []
        local = (server.url + "/", "data:", "blob:")
        page.on("request", lambda r: None if r.url.startswith(local) else page.outside.append(r.url))
        page.on("requestfinished", lambda r: None if r.url.startswith(local) else page.fetched_outside.append(r.url))
        page.on("pageerror", lambda e: page.errors.append(str(e)))
        yield page
        browser.close()


def test_docs_render_the_openapi_31_schema_offline(server, browser_page):
    page = browser_page
    assert server.client().get("/openapi.json").json()["openapi"].startswith("3.1")
    page.goto(server.url + "/docs")
    expect(page.locator(".opblock-summary-path", has_text="/v1/detect")).to_be_visible(timeout=30_000)
    expect(page.locator(".opblock-summary-path", has_text="/v1/chat/completions")).to_be_visible()
    body = page.locator("body").inner_text()
    assert "Unable to render" not in body and "Could not render" not in body
    assert page.locator(".opblock").count() >= 10
    assert "--form-string" in body and '["cat","dog"]' in body  # the curl forms that keep every label
    assert page.outside == [], page.outside
    assert page.errors == [], page.errors


def test_docs_operation_expands_and_shows_its_schema(server, browser_page):
    page = browser_page
    page.goto(server.url + "/docs")
    op = page.locator(".opblock-summary-path", has_text="/v1/detect").first
    op.click()
    expect(page.locator(".opblock-body").first).to_be_visible(timeout=15_000)
    expect(page.locator(".opblock-body").first).to_contain_text("labels")
    expect(page.locator(".opblock-body").first).to_contain_text("multipart/form-data")
    assert page.errors == [], page.errors


def test_redoc_is_served_offline(server, browser_page):
    page = browser_page
    html = server.client().get("/redoc").text
    assert "cdn" not in html.lower() and "fonts.googleapis" not in html
    page.goto(server.url + "/redoc")
    expect(page.get_by_text("/v1/segment").first).to_be_attached(timeout=30_000)
    # Redoc's sidebar asks for its vendor's logo; the page's Content-Security-Policy blocks it
    assert all("redoc.ly" in u for u in page.outside), page.outside
    assert page.fetched_outside == [], page.fetched_outside
