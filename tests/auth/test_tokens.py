"""Bearer tokens: every forged, stale or oversized token is refused with 401 problem+json."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import anyio
import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.auth.tokens import P256_ORDER, DevIssuer, InvalidToken, KeySet, TokenVerifier
from service.config import Settings
from service.crypto.issuer_keys import generate_private_pem, public_pem
from tests.conftest import bearer

ISSUER = "casepackets-dev"
AUDIENCE = "casepackets"
# Public keys a JWKS may list that no token here may be verified with.
P384_KEY = {
    "kty": "EC",
    "crv": "P-384",
    "x": "vUt-P-E0IBrstW8FtW0GKCcY2Aiei2JWMT02u7IMhQpqATl-5XzoegKYONYcZAra",
    "y": "lROd6HVOyPqegIfhrQMfMxHLfRYiSp29WXJ0jxWM7NmaemdBq7d3IJ0r6z3WAgaF",
}
RSA_1024_BIT_KEY = {
    "kty": "RSA",
    "n": (
        "49TYjqzepbOeokBCrA01y2HpPUlDzKQ_qqSUbXQPRJ0mgbVHnbx30M_B61fOhp753GqSpx_6koKfSA1UEa8hIT8o"
        "7M4wsb8pNAmx6HkWEU6P0LJ0c1KW0MmxkcwPp72EqgRywiFPvV2UYVRIX0f4n0xot-UU6ILRfQ0TMmvLvt0"
    ),
    "e": "AQAB",
}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FastAPI, TestClient]]:
    """An app whose auth does not touch the database (``/v1/me``)."""
    from service.main import create_app

    home = tmp_path_factory.mktemp("auth-home")
    app = create_app(Settings(env="test", home=home, database_url=f"sqlite:///{home}/x.db"))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield app, client


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: Mapping[str, Any], claims: Mapping[str, Any], sign: bytes | None) -> str:
    """Build a JWS by hand (HMAC with ``sign`` as secret, or no signature at all)."""
    signing_input = (
        f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    ).encode()
    signature = b"" if sign is None else hmac.new(sign, signing_input, hashlib.sha256).digest()
    return f"{signing_input.decode()}.{b64url(signature)}"


def good_claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "prof-001",
        "iat": now,
        "exp": now + 600,
        "roles": ["professional"],
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def rs256_issuer(home_key: bytes) -> DevIssuer:
    return DevIssuer(private_pem=home_key, algorithm="RS256", issuer=ISSUER, audience=AUDIENCE)


def es256_issuer() -> DevIssuer:
    return DevIssuer(
        private_pem=generate_private_pem("ES256"),
        algorithm="ES256",
        issuer=ISSUER,
        audience=AUDIENCE,
    )


def es256_verifier(issuer: DevIssuer) -> TokenVerifier:
    """A verifier of ES256 tokens that trusts ``issuer``'s key alone."""
    return TokenVerifier(
        algorithm="ES256",
        issuer=ISSUER,
        audience=AUDIENCE,
        roles_claim="roles",
        keys=KeySet([issuer.public_jwk], algorithm="ES256"),
    )


def count_full_checks(verifier: TokenVerifier, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The tokens ``verifier`` checks from scratch (not from memory), in order, from now on."""
    full_checks: list[str] = []
    check = verifier._verify

    def counted(token: str, **options: Any) -> Any:
        full_checks.append(token)
        return check(token, **options)

    monkeypatch.setattr(verifier, "_verify", counted)
    return full_checks


def rs256_verifier(
    keys: KeySet,
    *,
    roles_claim: str = "roles",
    leeway_seconds: int = 30,
    clock: Callable[[], float] = time.time,
) -> TokenVerifier:
    return TokenVerifier(
        algorithm="RS256",
        issuer=ISSUER,
        audience=AUDIENCE,
        roles_claim=roles_claim,
        keys=keys,
        leeway_seconds=leeway_seconds,
        clock=clock,
    )


def assert_401(client: TestClient, token: str, reason: str) -> None:
    response = client.get("/v1/me", headers=bearer(token))
    assert response.status_code == 401, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert reason in response.json()["detail"]


def test_valid_token_is_accepted(api: tuple[FastAPI, TestClient]) -> None:
    app, client = api
    token = app.state.dev_issuer.mint(subject="prof-001", roles=["professional"])
    response = client.get("/v1/me", headers=bearer(token))
    assert response.status_code == 200
    assert response.json()["sub"] == "prof-001"
    assert "packets.open" in response.json()["permissions"]


def test_missing_token_is_401(api: tuple[FastAPI, TestClient]) -> None:
    response = api[1].get("/v1/me")
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_two_authorization_headers_are_refused_whichever_comes_first(
    api: tuple[FastAPI, TestClient],
) -> None:
    """Of two Authorization headers a proxy in front may read one and the service the other."""
    app, client = api
    valid = bearer(app.state.dev_issuer.mint(subject="prof-001", roles=["professional"]))
    for second in (valid, bearer("not.a.jwt"), {"Authorization": "Basic dXNlcjpwYXNz"}):
        headers = [*valid.items(), *second.items()]
        for order in (headers, headers[::-1]):
            response = client.get("/v1/me", headers=order)
            assert response.status_code == 401, response.text
            assert response.headers["content-type"].startswith("application/problem+json")
            assert response.json()["detail"] == "send one Authorization header, not several"
            assert valid["Authorization"].split()[1] not in response.text


def test_alg_none_is_refused(api: tuple[FastAPI, TestClient]) -> None:
    app, client = api
    header = {"alg": "none", "typ": "JWT", "kid": app.state.dev_issuer.kid}
    assert_401(client, forge(header, good_claims(), None), "algorithm must be RS256")


@pytest.mark.parametrize("encoding", ["pem", "der"])
def test_hs256_signed_with_the_public_key_is_refused(
    api: tuple[FastAPI, TestClient], home_key: bytes, encoding: str
) -> None:
    app, client = api
    pem = public_pem(home_key)
    der = base64.b64decode(b"".join(pem.splitlines()[1:-1]))
    secret = pem if encoding == "pem" else der
    header = {"alg": "HS256", "typ": "JWT", "kid": app.state.dev_issuer.kid}
    assert_401(client, forge(header, good_claims(), secret), "algorithm must be RS256")


@pytest.fixture(scope="module")
def home_key(api: tuple[FastAPI, TestClient]) -> bytes:
    settings: Settings = api[0].state.settings
    return Path(settings.dev_issuer_key_path).read_bytes()


def test_token_from_another_key_with_a_known_kid_is_refused(
    api: tuple[FastAPI, TestClient],
) -> None:
    app, client = api
    impostor = DevIssuer(
        private_pem=generate_private_pem("RS256"),
        algorithm="RS256",
        issuer=ISSUER,
        audience=AUDIENCE,
        kid=app.state.dev_issuer.kid,
    )
    token = impostor.mint(subject="prof-001", roles=["admin"])
    assert_401(client, token, "signature does not verify")


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        (good_claims(iat=int(time.time()) - 7200, exp=int(time.time()) - 3600), "expired"),
        (good_claims(nbf=int(time.time()) + 3600), "not yet valid"),
        (good_claims(iat=int(time.time()) + 3600, exp=int(time.time()) + 7200), "future"),
        (good_claims(aud="someone-else"), "audience"),
        (good_claims(iss="https://evil.example"), "issuer"),
        (good_claims(sub=None), "required claim"),
        (good_claims(exp=None), "required claim"),
        (good_claims(iat=None), "required claim"),
    ],
    ids=[
        "expired",
        "not-yet-valid",
        "issued-in-future",
        "audience",
        "issuer",
        "no-sub",
        "no-exp",
        "no-iat",
    ],
)
def test_bad_claims_are_refused(
    api: tuple[FastAPI, TestClient], claims: dict[str, Any], reason: str
) -> None:
    app, client = api
    assert_401(client, app.state.dev_issuer.sign(claims), reason)


@pytest.mark.parametrize(
    ("claim", "value"),
    [
        ("exp", None),
        ("exp", [1]),
        ("exp", "soon"),
        ("exp", float("inf")),
        ("exp", 1e400),
        ("exp", True),
        ("exp", 2.0e9),
        ("iat", None),
        ("iat", True),
        ("iat", float("-inf")),
        ("nbf", None),
        ("nbf", [0]),
        ("nbf", False),
    ],
)
def test_time_claims_of_another_type_are_refused_not_a_500(
    api: tuple[FastAPI, TestClient], claim: str, value: object
) -> None:
    app, client = api
    token = app.state.dev_issuer.sign({**good_claims(), claim: value})
    response = client.get("/v1/me", headers=bearer(token))
    assert response.status_code == 401, response.text
    assert response.headers["content-type"].startswith("application/problem+json")


@pytest.mark.parametrize(("claim", "value"), [("exp", "soon"), ("iat", "now"), ("nbf", "0")])
def test_a_time_claim_in_text_is_refused_naming_the_time_claims(
    api: tuple[FastAPI, TestClient], claim: str, value: str
) -> None:
    app, client = api
    token = app.state.dev_issuer.sign({**good_claims(), claim: value})
    assert_401(client, token, "token 'iat', 'exp' and 'nbf' must be whole numbers of seconds")


@pytest.mark.parametrize(
    ("claim", "value", "reason"),
    [
        ("aud", 1, "token 'aud' must be text or a list of text"),
        ("aud", [AUDIENCE, 1], "token 'aud' must be text or a list of text"),
        ("aud", {"aud": AUDIENCE}, "token 'aud' must be text or a list of text"),
        ("jti", 1, "token 'jti' must be text"),
        ("jti", ["id"], "token 'jti' must be text"),
    ],
)
def test_an_aud_or_jti_that_is_not_text_is_refused_naming_the_claim(
    api: tuple[FastAPI, TestClient], claim: str, value: object, reason: str
) -> None:
    app, client = api
    token = app.state.dev_issuer.sign({**good_claims(), claim: value})
    assert_401(client, token, reason)
    assert token not in client.get("/v1/me", headers=bearer(token)).text


@pytest.mark.parametrize(
    "subject",
    ["\ud800", "prof\x00001", "prof\n001", "x" * 129, "", 7, ["prof-001"], " ", "prof-001 ", " a"],
)
def test_a_subject_that_is_not_printable_text_is_refused_at_authentication(
    api: tuple[FastAPI, TestClient], subject: object
) -> None:
    app, client = api
    token = app.state.dev_issuer.sign({**good_claims(), "sub": subject})
    for path in ("/v1/me", f"/v1/packets/{'0' * 32}/clients"):
        response = client.get(path, headers=bearer(token))
        assert response.status_code == 401, (path, response.text)
        assert "token 'sub' must be printable text" in response.json()["detail"]


def test_a_token_living_longer_than_the_maximum_is_refused(
    api: tuple[FastAPI, TestClient],
) -> None:
    app, client = api
    now = int(time.time())
    day = 24 * 3600
    assert_401(client, app.state.dev_issuer.sign(good_claims(iat=now, exp=now + day + 1)), "longer")
    accepted = app.state.dev_issuer.sign(good_claims(iat=now, exp=now + day))
    assert client.get("/v1/me", headers=bearer(accepted)).status_code == 200


def test_the_maximum_lifetime_is_configurable(home_key: bytes) -> None:
    issuer = rs256_issuer(home_key)
    verifier = TokenVerifier(
        algorithm="RS256",
        issuer=ISSUER,
        audience=AUDIENCE,
        roles_claim="roles",
        keys=KeySet([issuer.public_jwk]),
        max_lifetime_seconds=300,
    )
    verifier.verify(issuer.mint(subject="prof-001", roles=["professional"], ttl_seconds=300))
    with pytest.raises(InvalidToken, match="longer than 300 seconds"):
        verifier.verify(issuer.mint(subject="prof-001", roles=["professional"], ttl_seconds=301))


@pytest.mark.parametrize(
    ("typ_header", "typ_claim", "accepted"),
    [
        ("JWT", None, True),
        ("at+jwt", None, True),
        ("application/at+JWT", None, True),
        ("JWT", "Bearer", True),
        ("JWT", "ID", False),
        ("JWT", "Refresh", False),
        ("JWT", "bearer ", False),
        ("dpop+jwt", None, False),
        ("JOSE", None, False),
        (["JWT"], None, False),
    ],
)
def test_only_access_tokens_are_accepted(
    api: tuple[FastAPI, TestClient], typ_header: object, typ_claim: str | None, accepted: bool
) -> None:
    app, client = api
    token = app.state.dev_issuer.sign(good_claims(typ=typ_claim), extra_headers={"typ": typ_header})
    if accepted:
        assert client.get("/v1/me", headers=bearer(token)).status_code == 200
    else:
        assert_401(client, token, "not an access token")


def sign_exactly(private_pem: bytes, header: str, claims: str) -> str:
    """An RS256 token of exactly this header and these claims, as JSON text (the issuer's own
    encoder writes every name once)."""
    signing_input = f"{b64url(header.encode())}.{b64url(claims.encode())}"
    key = serialization.load_pem_private_key(private_pem, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64url(signature)}"


@pytest.mark.parametrize(
    ("header", "claims", "part"),
    [
        ('{"alg": "none", "kid": KID, "alg": "RS256"}', "CLAIMS}", "header"),
        (
            '{"alg": "RS256", "kid": KID}',
            'CLAIMS, "sub": "coord-001", "roles": ["admin"]}',
            "claims",
        ),
    ],
    ids=["alg-twice", "sub-and-roles-twice"],
)
def test_a_token_naming_a_member_twice_is_refused(
    api: tuple[FastAPI, TestClient], home_key: bytes, header: str, claims: str, part: str
) -> None:
    """python-jose keeps the last of two values under one name, where another reader of the
    same token (a gateway, an audit tool) may keep the first: the two would see another
    algorithm, or another subject with other roles."""
    app, client = api
    kid = json.dumps(app.state.dev_issuer.kid)
    claims_once = json.dumps(good_claims())
    each_once = sign_exactly(
        home_key, '{"alg": "RS256", "kid": KID}'.replace("KID", kid), claims_once
    )
    assert client.get("/v1/me", headers=bearer(each_once)).status_code == 200
    token = sign_exactly(
        home_key, header.replace("KID", kid), claims.replace("CLAIMS", claims_once[:-1])
    )
    assert_401(client, token, f"a name appears twice in the token's {part}")


@pytest.mark.parametrize("header", ["jku", "x5u", "jwk"])
def test_key_location_headers_are_refused(api: tuple[FastAPI, TestClient], header: str) -> None:
    app, client = api
    token = app.state.dev_issuer.sign(
        good_claims(), extra_headers={header: "https://evil.example/keys.json"}
    )
    assert_401(client, token, f"may not carry {header}")


@pytest.mark.parametrize("kid", ["", ["kid"], {"kid": "k"}, 7, None])
def test_a_kid_that_is_not_text_is_refused_as_missing_not_a_500(
    api: tuple[FastAPI, TestClient], kid: object
) -> None:
    # A key is looked up by kid: a list or an object is no name for one (and no dict key).
    app, client = api
    token = app.state.dev_issuer.sign(good_claims(), extra_headers={"kid": kid})
    assert_401(client, token, "token header needs a 'kid'")


def test_oversized_token_is_refused_before_parsing(api: tuple[FastAPI, TestClient]) -> None:
    app, client = api
    token = app.state.dev_issuer.mint(
        subject="prof-001", roles=["professional"], extra_claims={"pad": "x" * 9 * 1024}
    )
    assert len(token) > 9 * 1024
    assert_401(client, token, "larger than 8192 bytes")


def test_garbage_is_refused(api: tuple[FastAPI, TestClient]) -> None:
    assert_401(api[1], "not.a.jwt", "well-formed")


def test_a_signature_spelled_another_way_is_refused_and_never_remembered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A decoder that ignores padding, stray characters or the unused bits of the last
    character would accept many strings for one token, each a separate place in the cache (and
    each pushing a real caller's token out of it)."""
    issuer = es256_issuer()
    verifier = es256_verifier(issuer)
    token = issuer.mint(subject="prof-001", roles=["professional"])
    signed, signature = token.rsplit(".", 1)
    # 64 signature bytes take 86 characters, whose last carries 4 unused bits.
    assert len(signature) == 86
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    unused_bit_set = alphabet[alphabet.index(signature[-1]) ^ 1]
    spellings = [
        token + "=",
        token + "==",
        token + "!",
        f"{signed}.{signature[:40]}!{signature[40:]}",
        f"{signed}.{signature[:40]} {signature[40:]}",
        f"{signed}.{signature[:-1]}{unused_bit_set}",
        token + "\udc80",  # a lone surrogate: no bytes stand for it
        f"{signed}.{signature[:-1]}",  # a length no base64 encoding has
    ]
    assert verifier.verify(token).subject == "prof-001"
    full_checks = count_full_checks(verifier, monkeypatch)
    for spelled in spellings:
        with pytest.raises(InvalidToken, match="well-formed"):
            verifier.verify(spelled)
    assert full_checks == []
    assert len(verifier._remembered) == 1


def test_an_es256_token_and_its_twin_with_s_replaced_by_n_minus_s_share_one_place(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ECDSA accepts (r, s) and (r, n - s) alike; both spellings must not take two places."""
    issuer = es256_issuer()
    verifier = es256_verifier(issuer)
    token = issuer.mint(subject="prof-001", roles=["professional"])
    signed, signature = token.rsplit(".", 1)
    raw = base64.urlsafe_b64decode(signature + "==")
    twin_s = P256_ORDER - int.from_bytes(raw[32:], "big")
    twin = f"{signed}.{b64url(raw[:32] + twin_s.to_bytes(32, 'big'))}"
    assert twin != token
    assert verifier.verify(token).subject == "prof-001"
    full_checks = count_full_checks(verifier, monkeypatch)
    assert verifier.verify(twin).subject == "prof-001"
    assert full_checks == []
    assert len(verifier._remembered) == 1
    fresh = es256_verifier(issuer)
    assert fresh.verify(twin).subject == "prof-001"  # the twin itself is a valid token
    assert fresh.verify(token).subject == "prof-001"
    assert len(fresh._remembered) == 1


def test_an_es256_signature_whose_s_is_not_below_n_is_refused_not_a_500(
    api: tuple[FastAPI, TestClient],
) -> None:
    """No valid signature has s >= n; working out its twin (n - s) must not fail on it."""
    issuer = es256_issuer()
    verifier = es256_verifier(issuer)
    signed = issuer.mint(subject="prof-001", roles=["professional"]).rsplit(".", 1)[0]
    raw = base64.urlsafe_b64decode(issuer.mint(subject="x", roles=[]).rsplit(".", 1)[1] + "==")
    for s in (P256_ORDER, 2**256 - 1):
        forged = f"{signed}.{b64url(raw[:32] + s.to_bytes(32, 'big'))}"
        with pytest.raises(InvalidToken, match="does not verify"):
            verifier.verify(forged)


def test_roles_from_a_nested_claim_path(home_key: bytes) -> None:
    issuer = rs256_issuer(home_key)
    verifier = rs256_verifier(KeySet([issuer.public_jwk]), roles_claim="realm_access.roles")
    token = issuer.mint(subject="a", roles=["auditor"], roles_claim="realm_access.roles")
    assert verifier.verify(token).roles == frozenset({"auditor"})
    flat = issuer.mint(subject="a", roles=["auditor"], roles_claim="roles")
    assert verifier.verify(flat).roles == frozenset()


def test_es256_can_be_configured_and_rs256_is_then_refused(home_key: bytes) -> None:
    ec_issuer = es256_issuer()
    rsa_issuer = rs256_issuer(home_key)
    verifier = TokenVerifier(
        algorithm="ES256",
        issuer=ISSUER,
        audience=AUDIENCE,
        roles_claim="roles",
        keys=KeySet([ec_issuer.public_jwk, rsa_issuer.public_jwk], algorithm="ES256"),
    )
    assert verifier.verify(ec_issuer.mint(subject="s", roles=["analyst"])).subject == "s"
    with pytest.raises(InvalidToken, match="algorithm must be ES256"):
        verifier.verify(rsa_issuer.mint(subject="s", roles=["analyst"]))


def test_jwks_url_is_refetched_on_unknown_kid_at_most_once_a_minute(home_key: bytes) -> None:
    issuer = rs256_issuer(home_key)
    served: list[dict[str, Any]] = []
    fetches: list[str] = []
    now = [1000.0]
    old_key = {**rs256_issuer(generate_private_pem("RS256")).public_jwk, "kid": "old"}

    def fetch(url: str) -> Mapping[str, Any]:
        fetches.append(url)
        return {"keys": served or [old_key]}

    keys = KeySet(url="https://idp.example/jwks", fetch=fetch, clock=lambda: now[0])
    verifier = rs256_verifier(keys)
    token = issuer.mint(subject="s", roles=[])
    assert len(fetches) == 1
    # The provider rotates to our key, but we fetched less than a minute ago: no refetch.
    served.append(issuer.public_jwk)
    now[0] += 30
    with pytest.raises(InvalidToken, match="unknown key"):
        verifier.verify(token)
    assert len(fetches) == 1
    now[0] += 31
    assert verifier.verify(token).subject == "s"
    assert len(fetches) == 2


def test_a_repeated_token_is_verified_once_and_refused_once_it_expires(
    home_key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    issuer = rs256_issuer(home_key)
    now = [time.time()]
    verifier = rs256_verifier(KeySet([issuer.public_jwk]), leeway_seconds=30, clock=lambda: now[0])
    full_checks = count_full_checks(verifier, monkeypatch)
    token = issuer.mint(subject="prof-001", roles=["professional"], ttl_seconds=60)
    first = verifier.verify(token)
    assert verifier.verify(token) == first
    assert len(full_checks) == 1
    # Within the leeway it is still good; past it, the remembered token is refused, and stays so.
    now[0] = first.expires_at + 30
    assert verifier.verify(token).subject == "prof-001"
    now[0] = first.expires_at + 31
    with pytest.raises(InvalidToken, match="expired"):
        verifier.verify(token)
    with pytest.raises(InvalidToken, match="expired"):
        verifier.verify(token)
    # A refused token is never remembered: each attempt is checked in full.
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    for _ in range(2):
        with pytest.raises(InvalidToken):
            verifier.verify(forged)
    assert full_checks.count(forged) == 2


def test_a_remembered_token_is_refused_once_its_key_is_withdrawn(home_key: bytes) -> None:
    issuer = rs256_issuer(home_key)
    served: list[dict[str, Any]] = [issuer.public_jwk]
    now = [1000.0]
    keys = KeySet(
        url="https://idp.example/jwks",
        fetch=lambda _url: {"keys": list(served)},
        clock=lambda: now[0],
    )
    verifier = rs256_verifier(keys)
    token = issuer.mint(subject="s", roles=["auditor"])
    assert verifier.verify(token).roles == frozenset({"auditor"})
    # The provider withdraws the key and publishes another one.
    served[:] = [rs256_issuer(generate_private_pem("RS256")).public_jwk]
    now[0] += 61
    keys.refresh()
    with pytest.raises(InvalidToken, match="unknown key"):
        verifier.verify(token)


def test_remembered_tokens_are_bounded(home_key: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("service.auth.tokens.MAX_REMEMBERED_TOKENS", 3)
    issuer = rs256_issuer(home_key)
    verifier = rs256_verifier(KeySet([issuer.public_jwk]))
    tokens = [issuer.mint(subject=f"s{n}", roles=[]) for n in range(5)]
    for token in tokens:
        verifier.verify(token)
    assert len(verifier._remembered) == 3
    # The oldest were forgotten, never a token's text: only SHA-256 digests are kept.
    assert set(verifier._remembered) == {hashlib.sha256(t.encode()).digest() for t in tokens[2:]}
    assert [verifier.verify(t).subject for t in tokens] == [f"s{n}" for n in range(5)]


def test_jwks_file_is_pinned(tmp_path: Path, home_key: bytes) -> None:
    issuer = rs256_issuer(home_key)
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [issuer.public_jwk]}))
    keys = KeySet.from_file(path)
    assert keys.get(issuer.kid) is not None
    (published,) = keys.public_jwks()["keys"]
    assert published["kid"] == issuer.kid
    assert "d" not in published
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="'keys' list"):
        KeySet.from_file(bad)


def test_jwks_endpoint_publishes_only_public_members(api: tuple[FastAPI, TestClient]) -> None:
    response = api[1].get("/.well-known/jwks.json")
    assert response.status_code == 200
    (key,) = response.json()["keys"]
    assert key["kty"] == "RSA"
    assert key["kid"] == api[0].state.dev_issuer.kid
    assert not {"d", "p", "q", "dp", "dq", "qi"} & key.keys()


def test_an_unreachable_jwks_url_leaves_the_key_set_empty_until_a_fetch_succeeds(
    home_key: bytes,
) -> None:
    issuer = rs256_issuer(home_key)
    provider_up = [False]
    now = [0.0]

    def fetch(url: str) -> Mapping[str, Any]:
        if not provider_up[0]:
            raise httpx.ConnectError("connection refused")
        return {"keys": [issuer.public_jwk]}

    keys = KeySet(url="https://idp.example/jwks", fetch=fetch, clock=lambda: now[0])
    assert len(keys) == 0
    assert keys.readiness() == "no keys (JWKS fetch failed: ConnectError)"
    provider_up[0] = True
    assert keys.readiness() != "ok", "a failed fetch is retried at most once a minute"
    now[0] += 61
    assert keys.readiness() == "ok"
    assert keys.get(issuer.kid) is not None


class FakeProvider:
    """A JWKS URL whose keys, outages and clock the test controls; it records every fetch."""

    url = "https://idp.example/jwks"

    def __init__(self, *keys: Mapping[str, Any]) -> None:
        self.keys = [dict(k) for k in keys]
        self.outage: str | None = None
        self.now = 1000.0
        self.fetched_at: list[float] = []

    def fetch(self, url: str) -> Mapping[str, Any]:
        self.fetched_at.append(self.now)
        if self.outage == "unreachable":
            raise httpx.ConnectError("connection refused")
        if self.outage == "bad document":
            return {"keys": "rotating, back soon"}
        return {"keys": list(self.keys)}

    def key_set(self, *, max_age_seconds: float = 300) -> KeySet:
        return KeySet(
            url=self.url,
            fetch=self.fetch,
            clock=lambda: self.now,
            max_age_seconds=max_age_seconds,
        )


def test_a_key_withdrawn_from_the_jwks_url_is_refused_once_the_keys_reach_their_max_age(
    home_key: bytes,
) -> None:
    withdrawn, kept = rs256_issuer(home_key), rs256_issuer(generate_private_pem("RS256"))
    provider = FakeProvider(withdrawn.public_jwk, kept.public_jwk)
    verifier = rs256_verifier(provider.key_set(max_age_seconds=300))
    remembered = withdrawn.mint(subject="s", roles=["auditor"])
    assert verifier.verify(remembered).subject == "s"
    provider.keys = [kept.public_jwk]  # e.g. the withdrawn key leaked
    # Within the max age the keys are not fetched again, so the withdrawal is not yet seen.
    provider.now += 299
    assert verifier.verify(remembered).subject == "s"
    assert provider.fetched_at == [1000.0]
    provider.now += 1
    for token in (remembered, withdrawn.mint(subject="s", roles=["auditor"])):
        with pytest.raises(InvalidToken, match="unknown key"):
            verifier.verify(token)
    assert verifier.verify(kept.mint(subject="k", roles=[])).subject == "k"
    assert len(provider.fetched_at) == 2


def test_a_key_still_listed_keeps_working_across_refreshes(
    home_key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    issuer = rs256_issuer(home_key)
    provider = FakeProvider(issuer.public_jwk)
    verifier = rs256_verifier(provider.key_set(max_age_seconds=300))
    full_checks = count_full_checks(verifier, monkeypatch)
    remembered = issuer.mint(subject="s", roles=["auditor"])
    for refresh in range(4):
        assert verifier.verify(remembered).subject == "s"
        assert verifier.verify(issuer.mint(subject=f"fresh{refresh}", roles=[])).subject
        provider.now += 300
    assert provider.fetched_at == [1000.0, 1300.0, 1600.0, 1900.0]
    # The refreshed key is the same key, so the remembered token needs no second full check.
    assert full_checks.count(remembered) == 1


@pytest.mark.parametrize(
    ("outage", "error"), [("unreachable", "ConnectError"), ("bad document", "ValueError")]
)
def test_a_failing_refresh_keeps_the_last_good_keys_for_one_more_max_age_then_refuses(
    home_key: bytes, outage: str, error: str
) -> None:
    issuer = rs256_issuer(home_key)
    provider = FakeProvider(issuer.public_jwk)
    keys = provider.key_set(max_age_seconds=300)
    verifier = rs256_verifier(keys)
    remembered = issuer.mint(subject="s", roles=["auditor"])
    assert verifier.verify(remembered).subject == "s"
    provider.outage = outage
    # Last good fetch at 1000: due at 1300, trusted (while retried) until just before 1600.
    for provider.now in (1300.0, 1450.0, 1599.0):
        assert verifier.verify(remembered).subject == "s"
        assert verifier.verify(issuer.mint(subject="t", roles=[])).subject == "t"
        assert keys.readiness() == "ok"
    assert provider.fetched_at == [1000.0, 1300.0, 1450.0, 1599.0]
    provider.now = 1600.0
    for token in (remembered, issuer.mint(subject="t", roles=[])):
        with pytest.raises(InvalidToken, match="unknown key"):
            verifier.verify(token)
    assert keys.readiness() == f"no keys (JWKS fetch failed: {error})"
    # Once the provider answers again, tokens are accepted from the next attempt (a minute after
    # the last one, at 1599).
    provider.outage = None
    provider.now = 1658.0
    assert keys.readiness() != "ok"
    provider.now = 1659.0
    assert verifier.verify(remembered).subject == "s"
    assert keys.readiness() == "ok"


def test_a_burst_of_requests_after_the_max_age_makes_one_fetch_a_minute(home_key: bytes) -> None:
    issuer = rs256_issuer(home_key)
    provider = FakeProvider(issuer.public_jwk)
    keys = provider.key_set(max_age_seconds=300)
    verifier = rs256_verifier(keys)
    tokens = [issuer.mint(subject=f"s{n}", roles=[]) for n in range(3)]

    def burst() -> None:
        for _ in range(10):
            for token in tokens:
                verifier.verify(token)
            keys.readiness()

    provider.now += 300
    burst()
    assert provider.fetched_at == [1000.0, 1300.0]
    # While the provider is down every request finds the keys stale; still one fetch a minute.
    provider.outage = "unreachable"
    provider.now = 1600.0
    burst()
    provider.now = 1659.0
    burst()
    provider.now = 1660.0
    burst()
    assert provider.fetched_at == [1000.0, 1300.0, 1600.0, 1660.0]


def test_requests_during_a_slow_refresh_use_the_pinned_keys_instead_of_waiting(
    home_key: bytes,
) -> None:
    issuer = rs256_issuer(home_key)
    provider = FakeProvider(issuer.public_jwk)
    fetching, answer = threading.Event(), threading.Event()

    def slow_fetch(url: str) -> Mapping[str, Any]:
        if provider.fetched_at:  # the fetch at start-up answers at once
            fetching.set()
            assert answer.wait(timeout=10)
        return provider.fetch(url)

    verifier = rs256_verifier(
        KeySet(url=provider.url, fetch=slow_fetch, clock=lambda: provider.now)
    )
    token = issuer.mint(subject="s", roles=[])
    provider.now += 300
    refresher = threading.Thread(target=verifier.verify, args=(token,))
    refresher.start()
    assert fetching.wait(timeout=10)
    try:
        for _ in range(5):
            assert verifier.verify(token).subject == "s"
    finally:
        answer.set()
        refresher.join(timeout=10)
    assert provider.fetched_at == [1000.0, 1300.0]


def test_a_due_refresh_runs_off_the_event_loop_while_other_requests_go_on(
    home_key: bytes,
) -> None:
    issuer, other = rs256_issuer(home_key), rs256_issuer(generate_private_pem("RS256"))
    provider = FakeProvider(issuer.public_jwk)
    fetching, answer = threading.Event(), threading.Event()
    loop_waited: list[bool] = []

    def slow_fetch(url: str) -> Mapping[str, Any]:
        if provider.fetched_at:  # the fetch at start-up answers at once
            fetching.set()
            # Only another task on the event loop answers: if the fetch blocked the loop, it
            # would wait here in vain until the timeout.
            loop_waited.append(not answer.wait(timeout=5))
        return provider.fetch(url)

    verifier = rs256_verifier(
        KeySet(url=provider.url, fetch=slow_fetch, clock=lambda: provider.now)
    )
    remembered = issuer.mint(subject="s", roles=[])
    assert verifier.verify(remembered).subject == "s"
    provider.keys.append(other.public_jwk)  # the provider adds a key and the keys are stale
    provider.now += 300
    verified: list[str] = []

    async def requests() -> None:
        async def verify(token: str) -> None:
            verified.append((await verifier.verify_async(token)).subject)

        async with anyio.create_task_group() as group:
            group.start_soon(verify, other.mint(subject="new key", roles=[]))
            assert await anyio.to_thread.run_sync(fetching.wait, 5)
            # Meanwhile the loop serves others, on the keys it has, without a second fetch.
            await verify(remembered)
            answer.set()

    anyio.run(requests)
    assert loop_waited == [False]
    assert verified == ["s", "new key"]
    assert provider.fetched_at == [1000.0, 1300.0]


def test_a_fetch_slower_than_the_retry_interval_answers_the_request_on_the_keys_it_brought(
    home_key: bytes,
) -> None:
    """The request that waited for the fetch is then judged on the keys held: it never asks
    for a second fetch (found due again once the first took over a minute), which escaped as a
    500."""
    issuer, rotated = rs256_issuer(home_key), rs256_issuer(generate_private_pem("RS256"))
    provider = FakeProvider(issuer.public_jwk)

    def slow_fetch(url: str) -> Mapping[str, Any]:
        answer = provider.fetch(url)
        if len(provider.fetched_at) > 1:  # the fetch at start-up answers at once
            provider.now += 61  # a provider dripping its answer (the timeout is per read)
        return answer

    verifier = rs256_verifier(
        KeySet(url=provider.url, fetch=slow_fetch, clock=lambda: provider.now)
    )
    provider.keys.append(rotated.public_jwk)
    provider.now += 61
    assert anyio.run(verifier.verify_async, rotated.mint(subject="new key", roles=[])).subject
    unknown = DevIssuer(
        private_pem=generate_private_pem("RS256"),
        algorithm="RS256",
        issuer=issuer.issuer,
        audience=issuer.audience,
        kid="made-up",
    )
    provider.now += 61
    with pytest.raises(InvalidToken, match="unknown key"):
        anyio.run(verifier.verify_async, unknown.mint(subject="s", roles=[]))
    assert provider.fetched_at == [1000.0, 1061.0, 1183.0]


def test_claims_nested_too_deeply_to_parse_are_refused_as_a_token(home_key: bytes) -> None:
    """Signed by a trusted key (an identity provider passing on a user's JSON attribute), the
    claims are parsed only after the signature checks out: too deep for the parser is a 401."""
    issuer = rs256_issuer(home_key)
    nested: Any = "deep"
    for _ in range(1200):
        nested = [nested]
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(5000)  # for the issuer's encoder; the service parses with the usual
    try:
        token = issuer.mint(subject="s", roles=[], extra_claims={"profile": nested})
    finally:
        sys.setrecursionlimit(limit)
    assert len(token) < 8192
    with pytest.raises(InvalidToken, match="nested too deeply"):
        rs256_verifier(KeySet([issuer.public_jwk])).verify(token)


@pytest.mark.parametrize(
    "marking",
    [{"use": "enc"}, {"key_ops": ["encrypt"]}, {"key_ops": "verify"}, {"alg": "RS512"}],
    ids=["use-enc", "key-ops-without-verify", "key-ops-not-a-list", "alg-of-another-algorithm"],
)
def test_a_pinned_key_marked_for_another_use_verifies_no_token(
    home_key: bytes, marking: dict[str, Any]
) -> None:
    issuer = rs256_issuer(home_key)
    token = issuer.mint(subject="s", roles=[])
    with pytest.raises(InvalidToken, match="unknown key"):
        rs256_verifier(KeySet([{**issuer.public_jwk, **marking}])).verify(token)
    for fit in ({"use": "sig"}, {"key_ops": ["verify"]}, {"alg": "RS256"}, {}):
        assert rs256_verifier(KeySet([{**issuer.public_jwk, **fit}])).verify(token).subject


def test_jwks_refresh_seconds_is_read_from_the_environment_and_must_be_positive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert Settings(env="test", home=tmp_path).jwks_refresh_seconds == 300
    monkeypatch.setenv("CASEPACKETS_JWKS_REFRESH_SECONDS", "60")
    assert Settings(env="test", home=tmp_path).jwks_refresh_seconds == 60
    monkeypatch.setenv("CASEPACKETS_JWKS_REFRESH_SECONDS", "0")
    with pytest.raises(ValueError, match="greater than 0"):
        Settings(env="test", home=tmp_path)
    with pytest.raises(ValueError, match="must be positive"):
        KeySet(url=FakeProvider.url, fetch=FakeProvider().fetch, max_age_seconds=0)


def write_jwks(path: Path, *keys: object) -> Path:
    path.write_text(json.dumps({"keys": list(keys)}))
    return path


def same_kid_issuer(issuer: DevIssuer) -> DevIssuer:
    """Another RS256 key published under ``issuer``'s ``kid``."""
    return DevIssuer(
        private_pem=generate_private_pem("RS256"),
        algorithm="RS256",
        issuer=ISSUER,
        audience=AUDIENCE,
        kid=issuer.kid,
    )


def test_a_jwks_file_with_two_signing_keys_under_one_kid_is_refused(
    tmp_path: Path, home_key: bytes
) -> None:
    issuer = rs256_issuer(home_key)
    path = write_jwks(tmp_path / "jwks.json", issuer.public_jwk, same_kid_issuer(issuer).public_jwk)
    with pytest.raises(ValueError, match=re.escape(f"signing key has kid '{issuer.kid}'")):
        KeySet.from_file(path)


def test_a_key_for_encryption_may_share_its_kid_with_the_signing_key(
    tmp_path: Path, home_key: bytes
) -> None:
    issuer = rs256_issuer(home_key)
    encryption_key = {**same_kid_issuer(issuer).public_jwk, "use": "enc"}
    for listed in ([issuer.public_jwk, encryption_key], [encryption_key, issuer.public_jwk]):
        keys = KeySet.from_file(write_jwks(tmp_path / "jwks.json", *listed))
        token = issuer.mint(subject="s", roles=[])
        assert rs256_verifier(keys).verify(token).subject == "s"


def test_a_refresh_listing_two_signing_keys_under_one_kid_keeps_the_keys_held_and_warns(
    home_key: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    issuer = rs256_issuer(home_key)
    impostor = same_kid_issuer(issuer)
    provider = FakeProvider(issuer.public_jwk)
    keys = provider.key_set(max_age_seconds=300)
    verifier = rs256_verifier(keys)
    provider.keys = [issuer.public_jwk, impostor.public_jwk]
    provider.now += 300
    caplog.set_level(logging.WARNING, logger="casepackets")
    assert verifier.verify(issuer.mint(subject="s", roles=[])).subject == "s"
    with pytest.raises(InvalidToken, match="does not verify"):
        verifier.verify(impostor.mint(subject="s", roles=["admin"]))
    assert provider.fetched_at == [1000.0, 1300.0]
    assert keys.readiness() == "ok"
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"more than one RS256 signing key has kid '{issuer.kid}'" in warning
    assert issuer.public_jwk["n"][:16] not in caplog.text
    assert impostor.public_jwk["n"][:16] not in caplog.text


def test_a_failed_refresh_is_logged_without_the_url_s_credentials(
    home_key: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    url = "https://svc:s3cret@idp.example/jwks?client_secret=abc#frag"
    issuer = rs256_issuer(home_key)
    impostor = same_kid_issuer(issuer)
    answers: list[Any] = [
        httpx.HTTPStatusError(
            "Server error '503'",
            request=httpx.Request("GET", url),
            response=httpx.Response(503, request=httpx.Request("GET", url)),
        ),
        {"keys": [issuer.public_jwk, impostor.public_jwk]},
    ]
    now = [1000.0]

    def fetch(_url: str) -> Mapping[str, Any]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        assert isinstance(answer, dict)
        return answer

    caplog.set_level(logging.WARNING, logger="casepackets")
    keys = KeySet(url=url, fetch=fetch, clock=lambda: now[0])
    now[0] += 61
    keys.refresh_if_due()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "JWKS refresh from https://idp.example/jwks failed, keeping the keys held: HTTP 503",
        "JWKS refresh from https://idp.example/jwks failed, keeping the keys held: "
        f"https://idp.example/jwks: more than one RS256 signing key has kid '{issuer.kid}'",
    ]
    for secret in ("s3cret", "client_secret", "frag", "svc"):
        assert secret not in caplog.text


def test_a_jwks_url_with_a_port_out_of_range_is_a_failed_fetch_not_a_crash(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def fetch(url: str) -> Mapping[str, Any]:
        raise httpx.ConnectError("cannot connect", request=httpx.Request("GET", "https://idp/"))

    caplog.set_level(logging.WARNING, logger="casepackets")
    keys = KeySet(url="https://u:s3cret@idp.example:99999/jwks", fetch=fetch)
    assert keys.readiness() == "no keys (JWKS fetch failed: ConnectError)"
    assert "https://idp.example:99999/jwks failed" in caplog.text
    assert "s3cret" not in caplog.text


def test_jwks_entries_that_are_not_objects_are_refused_and_keys_without_a_kid_reported(
    tmp_path: Path, home_key: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    issuer = rs256_issuer(home_key)
    with pytest.raises(ValueError, match="'keys' entry 0 is not an object"):
        KeySet.from_file(write_jwks(tmp_path / "jwks.json", "junk", issuer.public_jwk))
    caplog.set_level(logging.WARNING, logger="casepackets")
    without_kid = {k: v for k, v in issuer.public_jwk.items() if k != "kid"}
    keys = KeySet.from_file(write_jwks(tmp_path / "jwks.json", without_kid, issuer.public_jwk))
    assert len(keys) == 1
    assert "the key at position 0 has no 'kid'" in caplog.text


def app_with_jwks_file(
    tmp_path: Path, algorithm: Literal["RS256", "ES256"], *keys: object
) -> FastAPI:
    from service.main import create_app

    settings = Settings(
        env="test",
        home=tmp_path,
        database_url=f"sqlite:///{tmp_path}/x.db",
        jwt_algorithm=algorithm,
        jwks_file=write_jwks(tmp_path / "jwks.json", *keys),
    )
    return create_app(settings)


@pytest.mark.parametrize(
    ("algorithm", "key", "problem"),
    [
        ("ES256", P384_KEY, "ES256 needs a key on curve P-256"),
        ("ES256", {**P384_KEY, "crv": "P-521"}, "ES256 needs a key on curve P-256"),
        ("RS256", RSA_1024_BIT_KEY, "its modulus 'n' is missing or shorter than 2048 bits"),
    ],
    ids=["es256-on-p384", "es256-on-p521", "rs256-of-1024-bits"],
)
def test_a_key_too_weak_or_on_another_curve_is_refused_when_the_keys_are_loaded(
    tmp_path: Path, algorithm: Literal["RS256", "ES256"], key: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(f"key 'weak': {problem}")):
        app_with_jwks_file(tmp_path, algorithm, {**key, "kid": "weak"})


def test_a_token_naming_an_es256_key_on_another_curve_is_signed_by_an_unknown_key(
    tmp_path: Path,
) -> None:
    issuer = es256_issuer()
    app = app_with_jwks_file(tmp_path, "ES256", {**P384_KEY, "kid": "p384"}, issuer.public_jwk)
    with TestClient(app) as client:
        assert client.get("/v1/me", headers=bearer(issuer.mint(subject="s", roles=[]))).json()
        naming_p384 = issuer.sign(good_claims(), extra_headers={"kid": "p384"})
        assert_401(client, naming_p384, "unknown key")


@pytest.mark.parametrize(
    "broken",
    [
        {"kty": "RSA"},
        {"kty": "RSA", "n": "!!", "e": "AQAB"},
        {"kty": "RSA", "n": 5, "e": "AQAB"},
        {"kty": "RSA", "n": RSA_1024_BIT_KEY["n"] * 3, "e": "AQ"},
    ],
    ids=["no-modulus", "modulus-not-base64url", "modulus-not-text", "exponent-of-one"],
)
def test_a_jwks_entry_that_is_no_usable_key_is_set_aside_with_a_warning_not_blamed_on_tokens(
    home_key: bytes, caplog: pytest.LogCaptureFixture, broken: dict[str, Any]
) -> None:
    issuer = rs256_issuer(home_key)
    caplog.set_level(logging.WARNING, logger="casepackets")
    verifier = rs256_verifier(
        FakeProvider({**broken, "kid": "broken"}, issuer.public_jwk).key_set()
    )
    assert "key 'broken'" in caplog.text
    assert verifier.verify(issuer.mint(subject="s", roles=[])).subject == "s"
    naming_broken = issuer.sign(good_claims(), extra_headers={"kid": "broken"})
    with pytest.raises(InvalidToken, match="unknown key"):
        verifier.verify(naming_broken)
    # With no other key the fetch fails: nothing is ready, and the operator is told why.
    alone = FakeProvider({**broken, "kid": "broken"}).key_set()
    assert alone.readiness() == "no keys (JWKS fetch failed: ValueError)"
    assert "no key with a 'kid' usable for RS256 signatures (key 'broken': " in caplog.text
