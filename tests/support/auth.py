"""Keys, signed tokens and a local JWKS server for the authentication tests."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import asyncpg
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

SECRET = "gateway-test-jwt-secret-with-more-than-32-bytes"


ISSUER = "https://abcdefgh.supabase.co/auth/v1"


JWT_ENV = {"JWT_SECRET": SECRET, "JWT_ISSUER": ISSUER}


KEY = re.compile(r"gwk_[A-Za-z0-9_-]{43}")


def token_for(user_id: uuid.UUID, email: str = "ada@example.com") -> dict[str, str]:
    claims = {"sub": str(user_id), "email": email, "aud": "authenticated", "iss": ISSUER,
              "exp": int(time.time()) + 3600, "role": "authenticated"}
    return {"Authorization": "Bearer " + jwt.encode(claims, SECRET, algorithm="HS256")}


async def user_row(db: asyncpg.Pool | asyncpg.Connection, user_id: uuid.UUID) -> asyncpg.Record | None:
    # xmin changes with every write to the row, even one that rewrites identical values
    return await db.fetchrow("SELECT email, last_seen_at, xmin::text AS xmin FROM users WHERE id = $1", user_id)


USER_ID = uuid.UUID("6f1c2a4e-8d3b-4f5a-9c7e-1b2d3e4f5a6b")


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class JwksServer:
    """Serves `keys` as a JWK set (or `status` when it is not 200) and counts requests."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.status = 200
        self.gate: asyncio.Event | None = None  # when set by a test: each reply waits for it
        self.hits = 0
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.status != 200:
            return web.Response(status=self.status, text="upstream broke")
        return web.json_response({"keys": self.keys})


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_key_2() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def rsa_jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    return {**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid, "use": "sig"}


def ec_jwk(key: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    return {**ECAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid, "use": "sig"}


@pytest.fixture
async def jwks(aiohttp_server: Callable[[web.Application], Awaitable[TestServer]],
               rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> JwksServer:
    state = JwksServer()
    state.keys = [rsa_jwk(rsa_key, "rsa-1"), ec_jwk(ec_key, "ec-1")]
    app = web.Application()
    app.router.add_get("/auth/v1/.well-known/jwks.json", state.handle)
    server = await aiohttp_server(app)
    state.url = str(server.make_url("/auth/v1/.well-known/jwks.json"))
    return state


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def claims(**overrides: Any) -> dict[str, Any]:
    """Supabase-shaped claims; an override of None drops the claim."""
    now = int(time.time())
    base: dict[str, Any] = {"iss": ISSUER, "aud": "authenticated", "role": "authenticated",
                            "sub": str(USER_ID), "email": "ada@example.com", "iat": now, "exp": now + 3600}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}
