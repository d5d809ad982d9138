"""The Supabase issuer is checked by default: with JWKS_URL a Supabase project's
JWKS URL, tokens must carry `iss = https://<ref>.supabase.co/auth/v1` unless JWT_ISSUER says
otherwise (another issuer, or `*` for none). The keys are served by a real local JWKS server."""

from __future__ import annotations

import dataclasses

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.app import create_app
from gateway.config import Settings
from gateway.edge.jwt_auth import JwtVerifier
from gateway.errors import Unauthorized
from tests.support.auth import USER_ID, JwksServer, claims

PROJECT_JWKS = "https://abcdefgh.supabase.co/auth/v1/.well-known/jwks.json"
PROJECT_ISSUER = "https://abcdefgh.supabase.co/auth/v1"
OTHER_ISSUER = "https://zzzzzzzz.supabase.co/auth/v1"


@pytest.mark.parametrize("env, issuer", [
    ({"JWKS_URL": PROJECT_JWKS}, PROJECT_ISSUER),
    ({"JWKS_URL": "https://my-proj-01.supabase.co/auth/v1/.well-known/jwks.json"},
     "https://my-proj-01.supabase.co/auth/v1"),
    ({"JWKS_URL": PROJECT_JWKS, "JWT_ISSUER": "https://auth.example.com"}, "https://auth.example.com"),
    ({"JWKS_URL": PROJECT_JWKS, "JWT_ISSUER": "*"}, None),
    ({"JWKS_URL": "https://auth.example.com/.well-known/jwks.json"}, None),  # not Supabase: not guessed
    ({"JWKS_URL": "https://abcdefgh.supabase.co.evil.com/auth/v1/.well-known/jwks.json"}, None),
    ({"JWKS_URL": "http://abcdefgh.supabase.co/auth/v1/.well-known/jwks.json"}, None),
    ({"JWT_SECRET": "x" * 40}, None),
    ({"JWT_SECRET": "x" * 40, "JWT_ISSUER": PROJECT_ISSUER}, PROJECT_ISSUER),
], ids=["supabase", "ref_with_dash", "explicit", "star_turns_it_off", "other_host", "lookalike_host", "http",
        "hs_only", "hs_explicit"])
def test_the_issuer_follows_from_a_supabase_jwks_url(env: dict[str, str], issuer: str | None):
    assert Settings.from_env(env).jwt_issuer == issuer


def project_verifier(jwks: JwksServer, session, clock, **env: str) -> JwtVerifier:
    """Settings as a Supabase project's JWKS_URL makes them, with its keys fetched from the local server."""
    settings = Settings.from_env({"JWKS_URL": PROJECT_JWKS, **env})
    return JwtVerifier(dataclasses.replace(settings, jwks_url=jwks.url), session, clock=clock)


def signed(key: rsa.RSAPrivateKey, **overrides) -> str:
    return jwt.encode(claims(**overrides), key, algorithm="RS256", headers={"kid": "rsa-1"})


async def test_a_token_of_the_project_is_accepted(jwks, session, clock, rsa_key):
    identity = await project_verifier(jwks, session, clock).verify(signed(rsa_key, iss=PROJECT_ISSUER))
    assert identity.user_id == USER_ID


async def test_a_token_of_another_project_is_rejected(jwks, session, clock, rsa_key):
    with pytest.raises(Unauthorized, match=r"^token issuer not accepted$"):
        await project_verifier(jwks, session, clock).verify(signed(rsa_key, iss=OTHER_ISSUER))


async def test_a_token_without_an_issuer_is_rejected(jwks, session, clock, rsa_key):
    with pytest.raises(Unauthorized, match=r"^token has no 'iss' claim$"):
        await project_verifier(jwks, session, clock).verify(signed(rsa_key, iss=None))


async def test_jwt_issuer_star_accepts_any_issuer(jwks, session, clock, rsa_key):
    verifier = project_verifier(jwks, session, clock, JWT_ISSUER="*")
    assert (await verifier.verify(signed(rsa_key, iss=OTHER_ISSUER))).user_id == USER_ID


async def test_jwt_issuer_names_the_one_accepted_instead(jwks, session, clock, rsa_key):
    verifier = project_verifier(jwks, session, clock, JWT_ISSUER=OTHER_ISSUER)
    assert (await verifier.verify(signed(rsa_key, iss=OTHER_ISSUER))).user_id == USER_ID
    with pytest.raises(Unauthorized, match=r"^token issuer not accepted$"):
        await verifier.verify(signed(rsa_key, iss=PROJECT_ISSUER))


async def test_the_app_answers_401_to_another_projects_token(aiohttp_client, make_settings, jwks, rsa_key):
    settings = make_settings(JWKS_URL=PROJECT_JWKS)
    client = await aiohttp_client(create_app(dataclasses.replace(settings, jwks_url=jwks.url)))
    other = await client.get("/api/me", headers={"Authorization": "Bearer " + signed(rsa_key, iss=OTHER_ISSUER)})
    assert other.status == 401
    assert (await other.json())["error"]["message"] == "token issuer not accepted"
    own = await client.get("/api/me", headers={"Authorization": "Bearer " + signed(rsa_key, iss=PROJECT_ISSUER)})
    assert own.status == 200
    assert (await own.json())["user"] == {"id": str(USER_ID), "email": "ada@example.com"}
