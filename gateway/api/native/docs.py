"""GET /docs: Swagger UI for /openapi.json, from the files the `swagger-ui-py` wheel bundles
(Swagger UI 5, which reads OpenAPI 3.1). Nothing is loaded from another host: the page, its script
and stylesheet, and the document all come from this gateway, and the validator badge (which
would call out to a public validator) is off.

Only the wheel's static files are used (its templating and framework glue are not imported).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from aiohttp import web

from gateway.contract.operations import PUBLIC, errors, operation, path_string, response
from gateway.errors import NotFound


def _bundle_dir() -> Path:
    # located without importing the package: its __init__ pulls in Jinja2 and every framework handler
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the swagger-ui-py package is missing (a dependency of the gateway)")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


BUNDLE = _bundle_dir()
# the few bundled files the page uses, and nothing else: no directory walk, no path to resolve
ASSETS = {name: BUNDLE / name for name in ("swagger-ui.css", "swagger-ui-bundle.js", "favicon-32x32.png")}

PAGE = b"""<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>Chat gateway API</title>
  <link rel="icon" type="image/png" href="/docs/favicon-32x32.png">
  <link rel="stylesheet" href="/docs/swagger-ui.css">
  <script src="/docs/swagger-ui-bundle.js" defer></script>
  <script src="/docs/init.js" defer></script>
</head>
<body>
  <div id="swagger-ui"></div>
</body>
</html>
"""

# the bundle's own initializer points at a public petstore; ours at this gateway's document
INIT = b""""use strict";
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  validatorUrl: null,
  persistAuthorization: false,
  tryItOutEnabled: false,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
});
"""

# Swagger UI (React) sets inline styles and shows data: images; scripts only from this origin
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'")
HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


@operation("Interactive API docs for this document (Swagger UI, served locally)", "ops",
           {"200": response("The page", {"text/html": {"schema": {"type": "string"}}})}, security=PUBLIC)
async def page(request: web.Request) -> web.Response:
    return web.Response(body=PAGE, content_type="text/html", charset="utf-8",
                        headers={**HEADERS, "Content-Security-Policy": CSP, "Cache-Control": "no-cache"})


@operation("The docs page's assets (Swagger UI's bundled script and stylesheet)", "ops",
           {"200": response("The file", {"*/*": {"schema": {}}}), **errors(404)},
           parameters=[path_string("filename")], security=PUBLIC)
async def asset(request: web.Request) -> web.StreamResponse:
    name = request.match_info["filename"]
    if name == "init.js":
        return web.Response(body=INIT, content_type="text/javascript", charset="utf-8", headers=HEADERS)
    path = ASSETS.get(name)
    if path is None:
        raise NotFound("no such file")  # JSON, like every error (FileResponse's 404 is an empty body)
    return web.FileResponse(path, headers={**HEADERS, "Cache-Control": "public, max-age=86400"})
