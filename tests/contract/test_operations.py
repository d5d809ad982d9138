"""Each handler declares its operation (gateway/contract/operations.py), and GET /openapi.json's paths are
built from the route table with them: no path is listed by hand."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web

from gateway.app import create_app
from gateway.config import Settings
from gateway.contract.openapi import openapi_document, route_table
from gateway.contract.operations import ok, operation, operation_of
from tests.support.contract import documented_operations


def test_every_route_of_the_table_declares_its_operation(make_settings: Callable[..., Settings]) -> None:
    table = route_table(create_app(make_settings()).router)
    undeclared = [f"{method} {path}" for method, path, handler in table if operation_of(handler) is None]
    assert undeclared == []
    document = openapi_document(("demo",), table)
    assert documented_operations(document) == {f"{method} {path}" for method, path, _ in table}
    assert list(document["paths"]) == list(dict.fromkeys(path for _, path, _ in table))  # in the table's order


def test_a_route_without_an_operation_fails_the_document(make_settings: Callable[..., Settings]) -> None:
    async def undeclared(request: web.Request) -> web.Response:
        return web.Response()

    app = create_app(make_settings())
    app.router.add_get("/api/undeclared", undeclared)
    with pytest.raises(LookupError, match=r"GET /api/undeclared: .*undeclared declares no operation"):
        openapi_document(("demo",), route_table(app.router))


def test_metrics_on_its_own_listener_is_not_in_the_document(make_settings: Callable[..., Settings]) -> None:
    document = openapi_document(("demo",), route_table(create_app(make_settings(METRICS_PORT="9999")).router))
    assert "/metrics" not in document["paths"] and "/healthz" in document["paths"]


def test_an_operation_generates_its_path_from_what_the_handler_hands_over(
        make_settings: Callable[..., Settings]) -> None:
    from msgspec import Struct

    class Probe(Struct):
        name: str

    @operation("Probe", "ops", ok(200, "The probe", Probe), body=Probe)
    async def probe(request: web.Request) -> web.Response:
        return web.Response()

    # a ready schema instead of a struct
    @operation("Handed over", "ops", ok(200, "Done"), body={"type": "object"})
    async def handed_over(request: web.Request) -> web.Response:
        return web.Response()

    operation("Replaced?", "ops", ok(200, "No"))(probe)  # a handler's first declaration stands
    app = create_app(make_settings())
    app.router.add_post("/probe/{probe_id}", probe)
    app.router.add_post("/handed", handed_over)
    document = openapi_document(("demo",), route_table(app.router))
    probe_op: dict[str, Any] = document["paths"]["/probe/{probe_id}"]["post"]
    assert probe_op["summary"] == "Probe"
    assert probe_op["requestBody"] == {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Probe"}}}}
    assert probe_op["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Probe"}
    # an undeclared path parameter is a plain string
    assert probe_op["parameters"] == [{"name": "probe_id", "in": "path", "required": True,
                                       "schema": {"type": "string"}}]
    assert document["components"]["schemas"]["Probe"] == {
        "title": "Probe", "type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    assert document["paths"]["/handed"]["post"]["requestBody"]["content"]["application/json"]["schema"] == {
        "type": "object"}
    # a handler at a second path is an alias of the first
    assert document["paths"]["/v1/chat/sessions"]["post"]["summary"] == \
        "Create a thread (alias of POST /api/threads)"
