"""GET /docs: Swagger UI for /openapi.json from a wheel's bundled files, with
nothing loaded from another host; rendered by a real headless Chromium."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
from aiohttp.test_utils import TestClient

from tests.support.browser import Tab
from tests.support.common import MakeClient
from tests.support.contract import documented_operations

pytestmark = pytest.mark.processes  # starts processes of its own (see pyproject.toml)

REFERENCE = re.compile(r'(?:src|href)="([^"]+)"')


async def test_docs_html_and_every_asset_it_references_are_served_here(client: TestClient) -> None:
    resp = await client.get("/docs")
    assert resp.status == 200 and resp.content_type == "text/html"
    assert "script-src 'self';" in resp.headers["Content-Security-Policy"]
    html = await resp.text()
    assert "http://" not in html and "https://" not in html
    refs = REFERENCE.findall(html)
    assert refs == ["/docs/favicon-32x32.png", "/docs/swagger-ui.css", "/docs/swagger-ui-bundle.js", "/docs/init.js"]
    kinds = {"/docs/favicon-32x32.png": "image/png", "/docs/swagger-ui.css": "text/css",
             "/docs/swagger-ui-bundle.js": "javascript", "/docs/init.js": "javascript"}
    for ref in refs:
        asset = await client.get(ref)
        assert asset.status == 200 and kinds[ref] in asset.content_type, ref
        body = await asset.read()
        assert len(body) > (100 if ref == "/docs/init.js" else 500), ref
    init = await (await client.get("/docs/init.js")).text()
    assert 'url: "/openapi.json"' in init and "validatorUrl: null" in init
    # only the listed files: no walk into the package, no path to resolve
    for name in ("index.html", "swagger-initializer.js", "..%2F__init__.py", "swagger-editor-bundle.js"):
        missing = await client.get(f"/docs/{name}")
        assert missing.status == 404 and (await missing.json())["error"]["type"] == "not_found", name


async def test_chromium_renders_every_operation_and_asks_nothing_of_another_host(
        make_client: MakeClient, tab: Tab) -> None:
    client = await make_client()
    base = str(client.make_url("/"))
    origin = urlsplit(base).netloc
    requested: list[str] = []
    page = tab.page
    page.on("request", lambda r: requested.append(r.url))
    await page.goto(base + "docs")
    await page.locator(".opblock").first.wait_for()
    document: dict[str, Any] = orjson.loads(await (await client.get("/openapi.json")).read())
    operations = documented_operations(document)
    await page.wait_for_function(f"() => document.querySelectorAll('.opblock').length === {len(operations)}")
    shown = await page.eval_on_selector_all(
        ".opblock", """els => els.map(e => e.querySelector('.opblock-summary-method').textContent + ' ' +
                                      e.querySelector('.opblock-summary-path').getAttribute('data-path'))""")
    assert sorted(shown) == sorted(operations)
    assert await page.locator(".info .title").first.text_content() is not None
    await page.screenshot(path="/tmp/docs-page.png")
    foreign = [u for u in requested if urlsplit(u).scheme != "data" and urlsplit(u).netloc != origin]
    assert foreign == [] and any(u.endswith("/openapi.json") for u in requested)
    assert tab.errors == []
