"""The playground: a plain HTML + JavaScript page at `/` (no build step, nothing from a CDN).

The page holds no secret: the caller pastes an API key, which stays in the browser's
localStorage and goes out only as `Authorization` to this gateway.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from gateway.contract.operations import PUBLIC, errors, operation, path_string, response
from gateway.errors import NotFound

STATIC_DIR = Path(__file__).resolve().parents[2] / "static"
# everything the page loads comes from this origin; no inline script or style
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'")


@operation("The playground page (plain HTML and JS)", "ops",
           {"200": response("The page", {"text/html": {"schema": {"type": "string"}}})}, security=PUBLIC)
async def index(request: web.Request) -> web.FileResponse:
    resp = web.FileResponse(STATIC_DIR / "index.html", headers={
        "Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache"})
    return resp


# the page's own files, and nothing else: no directory walk, no path to resolve
ASSETS = frozenset(p.name for p in STATIC_DIR.iterdir() if p.is_file())


@operation("The playground's assets", "ops", {"200": response("The file", {"*/*": {"schema": {}}}), **errors(404)},
           parameters=[path_string("filename")], security=PUBLIC)
async def asset(request: web.Request) -> web.FileResponse:
    name = request.match_info["filename"]
    if name not in ASSETS:
        # raised here, not left to FileResponse (whose 404 is an empty octet-stream): errors are JSON
        raise NotFound("no such file")
    return web.FileResponse(STATIC_DIR / name, headers={"X-Content-Type-Options": "nosniff"})


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/", index)
    router.add_get("/static/{filename}", asset)
