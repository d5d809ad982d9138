"""JwtVerifier against tokens signed here and a real local JWKS server that counts its hits."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import time
from datetime import UTC, datetime
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.utils import base64url_encode

from gateway.config import Settings
from gateway.edge.jwt_auth import JwtIdentity, JwtVerifier
from gateway.errors import ConfigError, Unauthorized
from tests.support.auth import ISSUER, USER_ID, FakeClock, JwksServer, claims, rsa_jwk
from tests.support.common import wait_for

SECRET = "super-secret-jwt-token-with-at-least-32-characters-long"


def hs_verifier(**env: str) -> JwtVerifier:
    return JwtVerifier(Settings.from_env({"JWT_SECRET": SECRET, **env}), None)


def jwks_verifier(jwks: JwksServer, session: aiohttp.ClientSession, clock: FakeClock,
                  algorithms: str = "RS256,ES256", **overrides: Any) -> JwtVerifier:
    settings = Settings.from_env({"JWKS_URL": jwks.url, "JWT_ALGORITHMS": algorithms, "JWKS_MIN_REFRESH_S": "5"})
    return JwtVerifier(dataclasses.replace(settings, **overrides), session, clock=clock)


# -- HS256 and claims ----------------------------------------------------------------------------

async def test_hs256_token_yields_identity_with_sub_and_email() -> None:
    token_claims = claims()
    identity = await hs_verifier().verify(jwt.encode(token_claims, SECRET, algorithm="HS256"))
    # valid until `exp` plus the default 30 s leeway: when an open WebSocket of this token closes
    until = datetime.fromtimestamp(token_claims["exp"] + 30, UTC)
    assert identity == JwtIdentity(USER_ID, "ada@example.com", identity.claims, until)
    assert identity.claims["role"] == "authenticated"


async def test_identity_is_valid_until_exp_plus_the_configured_leeway() -> None:
    token_claims = claims()
    identity = await hs_verifier(JWT_LEEWAY_S="0").verify(jwt.encode(token_claims, SECRET, algorithm="HS256"))
    assert identity.valid_until == datetime.fromtimestamp(token_claims["exp"], UTC)


async def test_token_without_email_yields_identity_with_no_email() -> None:
    identity = await hs_verifier().verify(jwt.encode(claims(email=None), SECRET, algorithm="HS256"))
    assert (identity.user_id, identity.email) == (USER_ID, None)


async def test_hs256_token_signed_with_another_secret_is_rejected() -> None:
    token = jwt.encode(claims(), "another-secret-that-is-also-at-least-32-bytes", algorithm="HS256")
    with pytest.raises(Unauthorized, match=r"^token signature is invalid$"):
        await hs_verifier().verify(token)


async def test_expired_token_is_rejected() -> None:
    token = jwt.encode(claims(exp=int(time.time()) - 120), SECRET, algorithm="HS256")
    with pytest.raises(Unauthorized, match=r"^token expired$"):
        await hs_verifier().verify(token)


async def test_token_expired_within_leeway_passes() -> None:
    token = jwt.encode(claims(exp=int(time.time()) - 10), SECRET, algorithm="HS256")
    assert (await hs_verifier(JWT_LEEWAY_S="30").verify(token)).user_id == USER_ID


async def test_token_with_nbf_in_the_future_is_rejected() -> None:
    token = jwt.encode(claims(nbf=int(time.time()) + 300), SECRET, algorithm="HS256")
    with pytest.raises(Unauthorized, match=r"^token not yet valid$"):
        await hs_verifier().verify(token)


async def test_token_for_another_audience_is_rejected() -> None:
    token = jwt.encode(claims(aud="anon"), SECRET, algorithm="HS256")
    with pytest.raises(Unauthorized, match=r"^token audience not accepted$"):
        await hs_verifier().verify(token)


async def test_token_with_audience_list_containing_authenticated_passes() -> None:
    token = jwt.encode(claims(aud=["other", "authenticated"]), SECRET, algorithm="HS256")
    assert (await hs_verifier().verify(token)).user_id == USER_ID


async def test_token_from_another_issuer_is_rejected_when_issuer_configured() -> None:
    verifier = hs_verifier(JWT_ISSUER=ISSUER)
    assert (await verifier.verify(jwt.encode(claims(), SECRET, algorithm="HS256"))).user_id == USER_ID
    token = jwt.encode(claims(iss="https://evil.supabase.co/auth/v1"), SECRET, algorithm="HS256")
    with pytest.raises(Unauthorized, match=r"^token issuer not accepted$"):
        await verifier.verify(token)


async def test_token_without_exp_is_rejected() -> None:
    token = jwt.encode(claims(exp=None), SECRET, algorithm="HS256")
    with pytest.raises(Unauthorized, match=r"^token has no 'exp' claim$"):
        await hs_verifier().verify(token)


async def test_token_without_sub_is_rejected() -> None:
    token = jwt.encode(claims(sub=None), SECRET, algorithm="HS256")
    with pytest.raises(Unauthorized, match=r"^token has no 'sub' claim$"):
        await hs_verifier().verify(token)


async def test_token_with_non_uuid_sub_is_rejected() -> None:
    token = jwt.encode(claims(sub="ada"), SECRET, algorithm="HS256")
    with pytest.raises(Unauthorized, match=r"^token subject is not a user id$"):
        await hs_verifier().verify(token)


async def test_unsigned_alg_none_token_is_rejected() -> None:
    token = jwt.encode(claims(), None, algorithm="none")
    assert token.endswith(".")  # really unsigned
    with pytest.raises(Unauthorized, match=r"^token algorithm not allowed$"):
        await hs_verifier().verify(token)


async def test_garbage_token_is_rejected() -> None:
    for token in ("not-a-jwt", "a.b.c", "", "eyJhbGciOiJIUzI1NiJ9.%%%.###"):
        with pytest.raises(Unauthorized, match=r"^malformed token$|^invalid token$"):
            await hs_verifier().verify(token)


def test_hmac_secret_too_short_for_its_algorithm_fails_at_start() -> None:
    with pytest.raises(ConfigError, match="JWT_SECRET is not usable for HS256"):
        JwtVerifier(Settings.from_env({"JWT_SECRET": "short"}), None)


# -- algorithm confusion -------------------------------------------------------------------------

def hs256_signed_with(secret: bytes, payload: dict[str, Any], kid: str) -> str:
    """An HS256 token built by hand: PyJWT itself refuses to use a PEM key as an HMAC secret."""
    header = base64url_encode(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    body = base64url_encode(json.dumps(payload).encode())
    signature = hmac.new(secret, header + b"." + body, hashlib.sha256).digest()
    return (header + b"." + body + b"." + base64url_encode(signature)).decode()


def public_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


async def test_hs256_token_signed_with_rsa_public_key_is_rejected_when_only_jwks_configured(
        jwks: JwksServer, session: aiohttp.ClientSession, clock: FakeClock, rsa_key: rsa.RSAPrivateKey) -> None:
    token = hs256_signed_with(public_pem(rsa_key), claims(), kid="rsa-1")
    with pytest.raises(Unauthorized, match=r"^token algorithm not allowed$"):
        await jwks_verifier(jwks, session, clock).verify(token)
    assert jwks.hits == 0


async def test_hs256_token_signed_with_rsa_public_key_is_rejected_when_hmac_also_allowed(
        jwks: JwksServer, session: aiohttp.ClientSession, clock: FakeClock, rsa_key: rsa.RSAPrivateKey) -> None:
    settings = Settings.from_env({"JWT_SECRET": SECRET, "JWKS_URL": jwks.url, "JWT_ALGORITHMS": "HS256,RS256"})
    token = hs256_signed_with(public_pem(rsa_key), claims(), kid="rsa-1")
    with pytest.raises(Unauthorized, match=r"^token signature is invalid$"):
        await JwtVerifier(settings, session, clock=clock).verify(token)
    assert jwks.hits == 0  # HS* never consults the JWKS


# -- JWKS ----------------------------------------------------------------------------------------

async def test_rs256_token_verifies_with_jwks_key(
        jwks: JwksServer, session: aiohttp.ClientSession, clock: FakeClock, rsa_key: rsa.RSAPrivateKey) -> None:
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})
    identity = await jwks_verifier(jwks, session, clock).verify(token)
    assert (identity.user_id, identity.email, jwks.hits) == (USER_ID, "ada@example.com", 1)


async def test_es256_token_verifies_with_jwks_key(
        jwks: JwksServer, session: aiohttp.ClientSession, clock: FakeClock,
        ec_key: ec.EllipticCurvePrivateKey) -> None:
    verifier = jwks_verifier(jwks, session, clock)
    for _ in range(3):  # cached after the first
        token = jwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": "ec-1"})
        assert (await verifier.verify(token)).user_id == USER_ID
    assert jwks.hits == 1


async def test_token_alg_outside_configured_algorithms_is_rejected(
        jwks: JwksServer, session: aiohttp.ClientSession, clock: FakeClock,
        ec_key: ec.EllipticCurvePrivateKey) -> None:
    token = jwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": "ec-1"})
    with pytest.raises(Unauthorized, match=r"^token algorithm not allowed$"):
        await jwks_verifier(jwks, session, clock, algorithms="RS256").verify(token)
    assert jwks.hits == 0


async def test_rs256_token_whose_kid_names_an_ec_key_is_rejected(
        jwks: JwksServer, session: aiohttp.ClientSession, clock: FakeClock, rsa_key: rsa.RSAPrivateKey) -> None:
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "ec-1"})
    with pytest.raises(Unauthorized, match=r"^signing key does not match token algorithm$"):
        await jwks_verifier(jwks, session, clock).verify(token)


async def test_rs256_token_without_kid_is_rejected(
        jwks: JwksServer, session: aiohttp.ClientSession, clock: FakeClock, rsa_key: rsa.RSAPrivateKey) -> None:
    token = jwt.encode(claims(), rsa_key, algorithm="RS256")
    with pytest.raises(Unauthorized, match=r"^token has no key id$"):
        await jwks_verifier(jwks, session, clock).verify(token)


async def test_unknown_kid_refetches_at_most_once_per_min_refresh_window(
        jwks: JwksServer, session: aiohttp.ClientSession, clock: FakeClock, rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = jwks_verifier(jwks, session, clock)
    assert (await verifier.verify(jwt.encode(claims(), rsa_key, algorithm="RS256",
                                             headers={"kid": "rsa-1"}))).user_id == USER_ID
    assert jwks.hits == 1

    clock.now += 6  # past the 5 s window of the first fetch
    with pytest.raises(Unauthorized, match=r"^unknown signing key$"):
        await verifier.verify(jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "nope-1"}))
    assert jwks.hits == 2

    clock.now += 4  # still inside the window of that refetch
    with pytest.raises(Unauthorized, match=r"^unknown signing key$"):
        await verifier.verify(jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "nope-2"}))
    assert jwks.hits == 2

    clock.now += 2  # past it
    with pytest.raises(Unauthorized, match=r"^unknown signing key$"):
        await verifier.verify(jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "nope-2"}))
    assert jwks.hits == 3


async def test_concurrent_verifies_needing_a_refresh_share_one_fetch(
        jwks: JwksServer, session: aiohttp.ClientSession, clock: FakeClock, rsa_key: rsa.RSAPrivateKey) -> None:
    jwks.gate = asyncio.Event()
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})
    verifier = jwks_verifier(jwks, session, clock)
    verifies = asyncio.gather(*(verifier.verify(token) for _ in range(10)))

    async def fetch_in_flight() -> bool:  # all ten were started before the fetch could reach the server
        return jwks.hits >= 1

    await wait_for(fetch_in_flight)
    jwks.gate.set()
    identities = await verifies
    assert [i.user_id for i in identities] == [USER_ID] * 10
    assert jwks.hits == 1


async def test_rotated_key_verifies_after_refresh(
        jwks: JwksServer, session: aiohttp.ClientSession, clock: FakeClock,
        rsa_key: rsa.RSAPrivateKey, rsa_key_2: rsa.RSAPrivateKey) -> None:
    verifier = jwks_verifier(jwks, session, clock)
    old = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})
    assert (await verifier.verify(old)).user_id == USER_ID

    jwks.keys = [rsa_jwk(rsa_key_2, "rsa-2")]  # rotation: the old key is gone
    clock.now += 6
    new = jwt.encode(claims(), rsa_key_2, algorithm="RS256", headers={"kid": "rsa-2"})
    assert (await verifier.verify(new)).user_id == USER_ID
    assert jwks.hits == 2
    with pytest.raises(Unauthorized, match=r"^unknown signing key$"):
        await verifier.verify(old)
    assert jwks.hits == 2  # inside the window: no fetch for the retired kid


async def test_cache_older_than_ttl_is_refetched(
        jwks: JwksServer, session: aiohttp.ClientSession, clock: FakeClock, rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = jwks_verifier(jwks, session, clock, jwks_ttl_s=60.0)
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})
    await verifier.verify(token)
    clock.now += 59
    await verifier.verify(token)
    assert jwks.hits == 1
    clock.now += 1
    await verifier.verify(token)
    assert jwks.hits == 2


async def test_failed_refresh_keeps_old_keys(
        jwks: JwksServer, session: aiohttp.ClientSession, clock: FakeClock, rsa_key: rsa.RSAPrivateKey,
        caplog: pytest.LogCaptureFixture) -> None:
    verifier = jwks_verifier(jwks, session, clock, jwks_ttl_s=60.0)
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})
    await verifier.verify(token)
    jwks.status = 503
    clock.now += 61
    with caplog.at_level(logging.WARNING, logger="gateway.edge.jwt_auth"):
        assert (await verifier.verify(token)).user_id == USER_ID
    assert jwks.hits == 2
    assert "HTTP 503" in caplog.text


async def test_jwks_server_error_rejects_token(
        jwks: JwksServer, session: aiohttp.ClientSession, clock: FakeClock, rsa_key: rsa.RSAPrivateKey,
        caplog: pytest.LogCaptureFixture) -> None:
    jwks.status = 500
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})
    with (caplog.at_level(logging.WARNING, logger="gateway.edge.jwt_auth"),
          pytest.raises(Unauthorized, match=r"^signing keys unavailable$")):
        await jwks_verifier(jwks, session, clock).verify(token)
    assert jwks.hits == 1
    assert "JWKS fetch" in caplog.text and "HTTP 500" in caplog.text
    assert token not in caplog.text


def test_public_key_algorithms_without_http_session_fail_at_start() -> None:
    settings = Settings.from_env({"JWKS_URL": "http://127.0.0.1:9/jwks.json"})
    with pytest.raises(ConfigError, match="JWKS is not usable"):
        JwtVerifier(settings, None)
