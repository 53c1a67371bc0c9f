"""Bearer token verification and the built-in development issuer.

This is the ONLY module that imports python-jose. Invariants, each checked before a claim is
trusted:
- tokens over ``MAX_TOKEN_BYTES`` are refused before any parsing, and so is anything but a JWS in
  compact form whose signature segment is the one base64url encoding of its bytes (a token
  cannot be rewritten into many strings that all verify, each taking a place in the cache; the
  one other spelling ECDSA itself accepts, s replaced by n - s, shares its original's place);
- the header and the claims each name every member once: python-jose keeps the last of two
  values under one name, where another reader of the same token (a gateway, an audit tool) may
  keep the first, and see another ``alg``, ``kid``, ``sub`` or roles;
- the header must name exactly the configured asymmetric algorithm (RS256 or ES256) and a ``kid``;
  ``jku``, ``x5u``, ``jwk``, ``x5c`` and ``crit`` headers are refused (no key is ever taken from
  the token itself);
- the key is chosen by ``kid`` from the pinned key set only; that set holds only keys checked
  when it was loaded to be meant for verifying the one algorithm's signatures, of its type (an
  ES256 key on P-256, an RS256 key of at least 2048 bits) and well-formed, each under a ``kid``
  no other such key has (``KeySet`` says what happens to the others);
- keys from a JWKS URL are refetched once ``max_age_seconds`` old; a key no longer listed is
  refused from then on, and if the provider cannot be reached the last good keys are refused
  after one more ``max_age_seconds`` (``KeySet`` says why);
- ``jwt.decode`` always receives ``algorithms=[<the one algorithm>]``;
- ``exp``, ``iat``, ``iss``, ``aud`` and ``sub`` are required; ``nbf`` and a future ``iat`` are
  honoured with a small leeway; ``exp - iat`` may not exceed the configured maximum lifetime;
- it must be an access token: a ``typ`` header other than ``JWT`` or ``at+jwt`` is refused, and
  so is a ``typ`` claim other than ``Bearer`` (Keycloak marks its ID tokens ``ID``; an ID token
  for the same audience must not open the API);
- a token that passed all of this is remembered by its SHA-256 (never the token itself) so a
  client repeating it is not verified again; a remembered token is still refused once it
  expires, and is verified afresh when its key is no longer the pinned one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeGuard
from urllib.parse import urlsplit, urlunsplit

import anyio
import httpx
from jose import jwk, jwt
from jose.exceptions import JOSEError

MAX_TOKEN_BYTES = 8 * 1024
# A JWS in compact form: three base64url segments, without padding (RFC 7515, section 7.1); the
# signature may be empty here, so that an unsigned token is refused for its algorithm.
COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
FORBIDDEN_HEADERS = frozenset({"jku", "x5u", "jwk", "x5c", "crit"})
KEY_TYPE_FOR_ALGORITHM = {"RS256": "RSA", "ES256": "EC"}
REFETCH_INTERVAL_SECONDS = 60.0
# Default for CASEPACKETS_JWKS_REFRESH_SECONDS (service/config.py).
JWKS_MAX_AGE_SECONDS = 300.0
# Verified tokens remembered per process (oldest forgotten first): a few MB at most.
MAX_REMEMBERED_TOKENS = 10_000
# Default for CASEPACKETS_TOKEN_MAX_LIFETIME_SECONDS (service/config.py).
MAX_LIFETIME_SECONDS = 24 * 3600
# The ``typ`` header values of a JWT access token (RFC 7519 section 5.1, RFC 9068 section 2.1),
# compared without case and without an ``application/`` prefix.
ACCESS_TOKEN_TYPES = frozenset({"jwt", "at+jwt"})
# The order n of P-256's group: an ES256 signature (r, s) verifies exactly when (r, n - s) does.
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
# RFC 7518: ES256 is ECDSA on P-256 (section 3.4); RS256 keys MUST have 2048 bits or more (3.3).
CURVE_FOR_ALGORITHM = {"ES256": "P-256"}
MIN_RSA_MODULUS_BITS = 2048

logger = logging.getLogger("casepackets")


class InvalidToken(Exception):
    """The token is not acceptable; the message says why without echoing the token."""


class _FetchDue(Exception):
    """A key lookup that must not fetch found the URL's keys stale or the ``kid`` unknown, and a
    fetch may be made now: the caller fetches (off its event loop) and looks again."""


# What a key lookup does when a fetch of the URL's keys is due: make it, raise ``_FetchDue``
# (the caller makes it off its event loop), or go on with the keys held.
WhenDue = Literal["fetch", "defer", "skip"]


@dataclass(frozen=True)
class VerifiedToken:
    subject: str
    roles: frozenset[str]
    issued_at: int
    expires_at: int


@dataclass(frozen=True, eq=False)
class PinnedKey:
    """A key of the pinned set, checked when the set was loaded; ``verifier`` is built from it
    (building an RSA key costs more than verifying a signature, so it is done once per key)."""

    jwk: dict[str, Any]
    verifier: Any


@dataclass(frozen=True)
class _FetchedKeys:
    keys: dict[str, PinnedKey]
    fetched_at: float  # KeySet clock reading when the fetch began


@dataclass(frozen=True)
class _Remembered:
    token: VerifiedToken
    kid: str
    key: PinnedKey  # the pinned key the signature was checked against


class KeySet:
    """Pinned public keys by ``kid``: from a JWKS file, a JWKS URL, or given directly.

    Only keys meant for verifying ``algorithm`` signatures are held; keys for encryption or for
    another algorithm are passed over (a provider's JWKS often lists both). A key that is meant
    for them but cannot serve (without a ``kid``, on another curve, an RSA modulus under 2048
    bits, members that make no key) is set aside with a warning naming its ``kid``; two keys
    meant for them under one ``kid`` make the whole set a ``ValueError`` (which of them the
    provider signs with cannot be told), and so does a file or URL document with no usable key.

    Keys given directly or read from a file are fixed for the life of the process. Keys from a
    URL are fetched again once they are ``max_age_seconds`` old, so a key the provider withdraws
    (say, because it leaked) is refused at most that long after; a token remembered under it is
    then verified afresh and refused too.

    When that refresh fails (provider unreachable, or a document that is not a JWKS), the last
    good keys are kept for one more ``max_age_seconds``, so a short outage of the provider does
    not lock everyone out. After that they are no longer trusted: every token they would verify
    is refused and readiness reports no keys until the provider answers again. A service holding
    personal data would rather stop than trust keys that may have been withdrawn.

    The URL is fetched by the caller that finds the keys stale or the ``kid`` unknown (in a worker
    thread when that caller is the event loop: ``TokenVerifier.verify_async``), and at most once
    per ``REFETCH_INTERVAL_SECONDS`` (or per max age, if shorter) whether or not the fetch
    succeeds, so neither an outage nor a flood of unknown ``kid`` values hammers the provider. A
    caller that finds another one fetching does not wait: it uses the keys it has.
    """

    def __init__(
        self,
        keys: Sequence[Mapping[str, Any]] = (),
        *,
        algorithm: str = "RS256",
        url: str | None = None,
        fetch: Callable[[str], Mapping[str, Any]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_age_seconds: float = JWKS_MAX_AGE_SECONDS,
    ) -> None:
        if max_age_seconds <= 0:
            raise ValueError("max_age_seconds must be positive")
        if algorithm not in KEY_TYPE_FOR_ALGORITHM:
            raise ValueError(f"algorithm must be one of {sorted(KEY_TYPE_FOR_ALGORITHM)}")
        self.algorithm = algorithm
        self._pinned, _ = _usable_keys(keys, algorithm=algorithm, source="pinned keys")
        self._url = url
        self._fetch = fetch or _fetch_jwks
        self._clock = clock
        self._max_age = max_age_seconds
        self._retry_interval = min(REFETCH_INTERVAL_SECONDS, max_age_seconds)
        self._fetched: _FetchedKeys | None = None
        self._last_attempt: float | None = None
        self._lock = threading.Lock()
        self.last_error: str | None = None
        if url:
            # An identity provider that is down at start-up leaves the service not ready (no
            # keys, every token refused) instead of failing to start; keys come on next fetch.
            self.refresh_if_due()

    @classmethod
    def from_file(cls, path: Path, *, algorithm: str = "RS256") -> KeySet:
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read JWKS file {path}: {exc}") from exc
        keys = _jwks_keys(document, algorithm=algorithm, source=str(path))
        return cls([key.jwk for key in keys.values()], algorithm=algorithm)

    def refresh(self) -> None:
        """Fetch the JWKS URL now; keys it no longer lists are refused from here on.

        Raises ``httpx.HTTPError`` or ``ValueError`` when the fetch fails, keeping the keys we had.
        """
        if not self._url:
            return
        attempted_at = self._clock()
        self._last_attempt = attempted_at
        keys = _jwks_keys(
            self._fetch(self._url),
            algorithm=self.algorithm,
            source=shown_url(self._url),
            previous=self._fetched.keys if self._fetched else {},
        )
        self._fetched = _FetchedKeys(keys=keys, fetched_at=attempted_at)

    def refresh_if_due(self) -> None:
        """Refetch the JWKS URL unless an attempt was made within the retry interval or another
        caller is fetching right now; a failed fetch keeps the keys we have (see the class)."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            if self._attempted_lately():
                return
            try:
                self.refresh()
                self.last_error = None
            except (httpx.HTTPError, ValueError) as exc:
                self.last_error = type(exc).__name__
                logger.warning(
                    "JWKS refresh from %s failed, keeping the keys held: %s",
                    shown_url(self._url or ""),
                    _refresh_failure(exc),
                )
        finally:
            self._lock.release()

    def _attempted_lately(self) -> bool:
        """A fetch was attempted within the retry interval."""
        last = self._last_attempt
        return last is not None and self._clock() - last < self._retry_interval

    def _fetch_allowed(self) -> bool:
        """Whether ``refresh_if_due`` would fetch now (no attempt too recent, none under way)."""
        return not self._lock.locked() and not self._attempted_lately()

    def _is_stale(self) -> bool:
        fetched = self._fetched
        return fetched is None or self._clock() - fetched.fetched_at >= self._max_age

    def _trusted_url_keys(self) -> Mapping[str, PinnedKey]:
        """The URL's last good keys, or none once they are older than twice the max age."""
        fetched = self._fetched
        if fetched is None or self._clock() - fetched.fetched_at >= 2 * self._max_age:
            return {}
        return fetched.keys

    def _lookup(self, kid: str) -> PinnedKey | None:
        key = self._trusted_url_keys().get(kid)
        return key if key is not None else self._pinned.get(kid)

    def get(self, kid: str, *, when_due: WhenDue = "fetch") -> PinnedKey | None:
        """The trusted key ``kid``, fetching the URL first when that is due.

        With ``when_due="defer"`` a due fetch raises ``_FetchDue`` instead of being made here;
        with ``"skip"`` the keys held are used as they are.
        """
        key = self._lookup(kid)
        if self._url and (key is None or self._is_stale()):
            # Stale keys may include withdrawn ones; an unknown kid may mean the provider rotated.
            if when_due != "fetch":
                if when_due == "defer" and self._fetch_allowed():
                    raise _FetchDue
                return key
            self.refresh_if_due()
            key = self._lookup(kid)
        return key

    def readiness(self) -> str:
        """ "ok" while at least one key is trusted (fetching the URL again when it is due)."""
        if self._url and self._is_stale():
            self.refresh_if_due()
        if len(self):
            return "ok"
        return f"no keys (JWKS fetch failed: {self.last_error})" if self.last_error else "no keys"

    def public_jwks(self) -> dict[str, Any]:
        return {"keys": [_public_members(k.jwk) for k in self._pinned.values()]}

    def __len__(self) -> int:
        return len(self._pinned.keys() | self._trusted_url_keys().keys())


def shown_url(url: str) -> str:
    """``url`` as a log may show it: without a user, password, query or fragment (where a
    provider's client secret may ride)."""
    parts = urlsplit(url)
    # The text after any user and password (the port is not parsed: one out of range is shown
    # as given, not a second error inside the handler of the first).
    place = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, place, parts.path, "", ""))


def _refresh_failure(exc: Exception) -> str:
    """Why a JWKS fetch failed, for the log: our own refusal (it names the URL as ``shown_url``
    does, and a kid at most), the provider's status, or the kind of network error; never
    httpx's message, which quotes the whole URL."""
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    if isinstance(exc, httpx.HTTPError):
        return type(exc).__name__
    return str(exc)


def _fetch_jwks(url: str) -> Mapping[str, Any]:
    response = httpx.get(url, timeout=5.0, follow_redirects=False)
    response.raise_for_status()
    document = response.json()
    if not isinstance(document, dict):
        raise ValueError("JWKS document is not an object")
    return document


def _jwks_keys(
    document: Any,
    *,
    algorithm: str,
    source: str,
    previous: Mapping[str, PinnedKey] | None = None,
) -> dict[str, PinnedKey]:
    """A JWKS document's usable keys by ``kid`` (``_usable_keys``); none is a ``ValueError``
    saying why each key meant for the algorithm was set aside."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError(f"{source}: a JWKS document needs a 'keys' list")
    keys, set_aside = _usable_keys(
        document["keys"], algorithm=algorithm, source=source, previous=previous
    )
    if not keys:
        why = f" ({'; '.join(set_aside)})" if set_aside else ""
        raise ValueError(f"{source}: no key with a 'kid' usable for {algorithm} signatures{why}")
    return keys


def _usable_keys(
    entries: Sequence[Any],
    *,
    algorithm: str,
    source: str,
    previous: Mapping[str, PinnedKey] | None = None,
) -> tuple[dict[str, PinnedKey], list[str]]:
    """The entries meant for verifying ``algorithm`` signatures that can, by ``kid`` (see
    ``KeySet``), and why each of the others was set aside (also logged as a warning). An entry
    equal to one in ``previous`` keeps that one's identity, so tokens remembered under it stay
    remembered."""
    keys: dict[str, PinnedKey] = {}
    kids: set[str] = set()
    set_aside: list[str] = []
    for position, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise ValueError(f"{source}: 'keys' entry {position} is not an object")
        if not _for_signatures(entry) or not _meant_for(entry, algorithm):
            continue
        kid = entry.get("kid")
        if not isinstance(kid, str) or not kid:
            set_aside.append(f"the key at position {position} has no 'kid'")
            logger.warning("%s: %s key set aside: %s", source, algorithm, set_aside[-1])
            continue
        if kid in kids:
            raise ValueError(f"{source}: more than one {algorithm} signing key has kid {kid!r}")
        kids.add(kid)
        key = dict(entry)
        known = (previous or {}).get(kid)
        if known is not None and known.jwk == key:
            keys[kid] = known
            continue
        try:
            keys[kid] = PinnedKey(jwk=key, verifier=_verifier(key, algorithm))
        except _UnusableKey as exc:
            set_aside.append(f"key {kid!r}: {exc}")
            logger.warning("%s: %s key set aside: %s", source, algorithm, set_aside[-1])
    return keys, set_aside


class _UnusableKey(Exception):
    """A key meant for the algorithm's signatures cannot verify them; the message says why."""


def _meant_for(key: Mapping[str, Any], algorithm: str) -> bool:
    """Whether a JWK is of the algorithm's key type and names no other algorithm."""
    return key.get("kty") == KEY_TYPE_FOR_ALGORITHM[algorithm] and key.get("alg") in (
        None,
        algorithm,
    )


def _verifier(key: Mapping[str, Any], algorithm: str) -> Any:
    """The key built for verifying ``algorithm`` signatures, or ``_UnusableKey``."""
    curve = CURVE_FOR_ALGORITHM.get(algorithm)
    if curve is not None and key.get("crv") != curve:
        raise _UnusableKey(f"{algorithm} needs a key on curve {curve}")
    if key.get("kty") == "RSA" and _modulus_bits(key.get("n")) < MIN_RSA_MODULUS_BITS:
        raise _UnusableKey(
            f"its modulus 'n' is missing or shorter than {MIN_RSA_MODULUS_BITS} bits"
        )
    try:
        return jwk.construct(dict(key), algorithm)
    except (JOSEError, TypeError, ValueError):
        # The error's text may quote the key's members; what matters is that they make no key.
        raise _UnusableKey("its members do not make a public key") from None


def _modulus_bits(n: object) -> int:
    """The size of an RSA modulus given in base64url, or 0 when it is not one."""
    if not isinstance(n, str):
        return 0
    try:
        modulus = base64.urlsafe_b64decode(n + "=" * (-len(n) % 4))
    except ValueError:
        return 0
    return int.from_bytes(modulus, "big").bit_length()


def _public_members(key: Mapping[str, Any]) -> dict[str, Any]:
    private = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}
    return {name: value for name, value in key.items() if name not in private}


def _for_signatures(key: Mapping[str, Any]) -> bool:
    """Whether a JWK may verify signatures: its ``use``, when given, is ``sig`` and its
    ``key_ops``, when given, include ``verify`` (RFC 7517 4.2, 4.3)."""
    key_ops = key.get("key_ops")
    return key.get("use", "sig") == "sig" and (
        key_ops is None or (isinstance(key_ops, list) and "verify" in key_ops)
    )


def _roles_at(claims: Mapping[str, Any], path: str) -> frozenset[str]:
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return frozenset()
        value = value.get(part)
    if isinstance(value, str):
        return frozenset({value})
    if isinstance(value, list):
        return frozenset(v for v in value if isinstance(v, str))
    return frozenset()


class TokenVerifier:
    def __init__(
        self,
        *,
        algorithm: str,
        issuer: str,
        audience: str,
        roles_claim: str,
        keys: KeySet,
        leeway_seconds: int = 30,
        max_lifetime_seconds: int = MAX_LIFETIME_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if algorithm not in KEY_TYPE_FOR_ALGORITHM:
            raise ValueError(f"algorithm must be one of {sorted(KEY_TYPE_FOR_ALGORITHM)}")
        if keys.algorithm != algorithm:
            raise ValueError(f"the key set holds {keys.algorithm} keys, not {algorithm} ones")
        self.algorithm = algorithm
        self.issuer = issuer
        self.audience = audience
        self.roles_claim = roles_claim
        self.keys = keys
        self.leeway_seconds = leeway_seconds
        self.max_lifetime_seconds = max_lifetime_seconds
        self._clock = clock
        self._remembered: dict[bytes, _Remembered] = {}
        self._remembered_lock = threading.Lock()

    async def verify_async(self, token: str) -> VerifiedToken:
        """``verify`` for the event loop: a JWKS fetch that is due runs in a worker thread, so
        the loop (and every other request of this worker) does not wait on the provider."""
        try:
            return self.verify(token, when_due="defer")
        except _FetchDue:
            await anyio.to_thread.run_sync(self.keys.refresh_if_due)
        # With the keys that fetch left: one that took longer than the retry interval finds
        # another one due, which this request does not make or wait for.
        return self.verify(token, when_due="skip")

    def verify(self, token: str, *, when_due: WhenDue = "fetch") -> VerifiedToken:
        """The token's subject and roles once every check passed, or ``InvalidToken``.

        ``when_due`` is for ``verify_async``: what a due JWKS fetch does (``KeySet.get``).
        """
        digest = self._memory_key(token)
        remembered = self._remembered.get(digest)
        if remembered is not None:
            if self.keys.get(remembered.kid, when_due=when_due) is remembered.key:
                if not self._expired(remembered.token.expires_at, now=self._clock()):
                    return remembered.token
                self._forget(digest)
                raise InvalidToken("token has expired")
            self._forget(digest)  # the key was rotated or withdrawn: check everything again
        verified, kid, key = self._verify(token, when_due=when_due)
        with self._remembered_lock:
            if len(self._remembered) >= MAX_REMEMBERED_TOKENS:
                self._remembered.pop(next(iter(self._remembered)))
            self._remembered[digest] = _Remembered(verified, kid, key)
        return verified

    def _memory_key(self, token: str) -> bytes:
        """Where a verified token is remembered: the SHA-256 of its one spelling (for ES256, the
        spelling with the smaller of s and n - s, so a token and its twin share one place)."""
        raw = _signature_bytes(token)
        compact = token.encode("ascii")
        if self.algorithm == "ES256":
            s = int.from_bytes(raw[32:], "big")
            # (an s of n or more is no signature at all: the verifier refuses it as it stands)
            if len(raw) == 64 and P256_ORDER // 2 < s < P256_ORDER:
                low = raw[:32] + (P256_ORDER - s).to_bytes(32, "big")
                signed = token[: token.rindex(".")]
                compact = f"{signed}.{base64.urlsafe_b64encode(low).rstrip(b'=').decode()}".encode()
        return hashlib.sha256(compact).digest()

    def _expired(self, expires_at: int, *, now: float) -> bool:
        return expires_at + self.leeway_seconds < now

    def _forget(self, digest: bytes) -> None:
        with self._remembered_lock:
            self._remembered.pop(digest, None)

    def _verify(self, token: str, *, when_due: WhenDue) -> tuple[VerifiedToken, str, PinnedKey]:
        """Every check on the token itself; returns it with the ``kid`` and pinned key used."""
        try:
            header = jwt.get_unverified_header(token)
        except JOSEError as exc:
            raise InvalidToken("token is not a well-formed JWS") from exc
        if not isinstance(header, dict):
            raise InvalidToken("token header is not an object")
        _refuse_repeated_names(token.split(".", 1)[0], part="header")
        if header.get("alg") != self.algorithm:
            raise InvalidToken(f"token algorithm must be {self.algorithm}")
        forbidden = sorted(FORBIDDEN_HEADERS & header.keys())
        if forbidden:
            raise InvalidToken(f"token header may not carry {', '.join(forbidden)}")
        if "typ" in header and not _access_token_type(header["typ"]):
            raise InvalidToken(TYPE_REASON)
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise InvalidToken("token header needs a 'kid'")
        key = self.keys.get(kid, when_due=when_due)
        if key is None:
            raise InvalidToken("token is signed by an unknown key")
        try:
            claims = jwt.decode(
                token,
                key.verifier,
                algorithms=[self.algorithm],
                audience=self.audience,
                issuer=self.issuer,
                options={
                    "require_exp": True,
                    "require_iat": True,
                    "require_aud": True,
                    "require_iss": True,
                    "require_sub": True,
                    "leeway": self.leeway_seconds,
                },
            )
        except JOSEError as exc:
            raise InvalidToken(_reason(exc)) from exc
        except (TypeError, OverflowError):
            # python-jose reads the time claims through int() and turns only its ValueError (a
            # text) into a JOSEError: a null, a list or an infinite value fails there as is.
            raise InvalidToken(TIME_CLAIMS_REASON) from None
        except RecursionError:
            # python-jose parses the signed claims with json.loads, which gives up on JSON
            # nested deeper than Python's recursion limit.
            raise InvalidToken("token claims are nested too deeply") from None
        # Parsed again only now that the signature checks out, like python-jose's own parse.
        _refuse_repeated_names(token.split(".", 2)[1], part="claims")
        if claims.get("typ", "Bearer") != "Bearer":
            raise InvalidToken(TYPE_REASON)
        subject = claims.get("sub")
        if not usable_subject(subject):
            raise InvalidToken(SUBJECT_REASON)
        issued_at, expires_at = claims.get("iat"), claims.get("exp")
        if not all(_seconds(claims[name]) for name in ("iat", "exp", "nbf") if name in claims):
            raise InvalidToken(TIME_CLAIMS_REASON)
        now = self._clock()
        if issued_at > now + self.leeway_seconds:
            raise InvalidToken("token is issued in the future")
        if self._expired(expires_at, now=now):
            raise InvalidToken("token has expired")
        if expires_at - issued_at > self.max_lifetime_seconds:
            raise InvalidToken(
                f"token lifetime (exp - iat) is longer than {self.max_lifetime_seconds} seconds"
            )
        verified = VerifiedToken(
            subject=subject,
            roles=_roles_at(claims, self.roles_claim),
            issued_at=issued_at,
            expires_at=expires_at,
        )
        return verified, kid, key


TIME_CLAIMS_REASON = "token 'iat', 'exp' and 'nbf' must be whole numbers of seconds"
TYPE_REASON = "token is not an access token (header 'typ' JWT or at+jwt, claim 'typ' Bearer)"
# The subject becomes the access log's actor, a professional's id (≤ 128) and who started a run
# or pushed a flag (columns of 128 characters: PostgreSQL refuses more, SQLite would not).
MAX_SUBJECT_CHARS = 128
SUBJECT_REASON = (
    f"token 'sub' must be printable text of 1 to {MAX_SUBJECT_CHARS} characters, "
    "without spaces around it"
)


def _signature_bytes(token: str) -> bytes:
    """The token's signature, if the token is a JWS in compact form whose signature segment is
    the one encoding of those bytes (a decoder that ignores padding, stray characters or the
    unused bits of the last character would take many spellings of one signature); else
    ``InvalidToken``. The header and payload need no such check: the signature covers their
    exact text."""
    if len(token) > MAX_TOKEN_BYTES:
        raise InvalidToken(f"token is larger than {MAX_TOKEN_BYTES} bytes")
    if COMPACT_JWS.fullmatch(token) is None:
        raise InvalidToken("token is not a well-formed JWS")
    signature = token[token.rindex(".") + 1 :]
    try:
        decoded = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    except ValueError:  # a length no encoding has
        raise InvalidToken("token is not a well-formed JWS") from None
    if base64.urlsafe_b64encode(decoded).rstrip(b"=").decode("ascii") != signature:
        raise InvalidToken("token is not a well-formed JWS")
    return decoded


class _RepeatedName(ValueError):
    pass


def _each_name_once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    fields = dict(pairs)
    if len(fields) != len(pairs):
        raise _RepeatedName
    return fields


def _refuse_repeated_names(segment: str, *, part: str) -> None:
    """``InvalidToken`` unless every object in the token's ``segment`` (its header or its
    claims, which python-jose has read already) names each member once."""
    try:
        json.loads(
            base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)),
            object_pairs_hook=_each_name_once,
        )
    except _RepeatedName:
        raise InvalidToken(f"a name appears twice in the token's {part}") from None
    except (ValueError, RecursionError):
        raise InvalidToken("token is not a well-formed JWS") from None


def _seconds(value: object) -> bool:
    """A whole number of seconds (JSON true is not one, though Python counts it as an int)."""
    return type(value) is int


def _access_token_type(value: object) -> bool:
    return isinstance(value, str) and value.lower().removeprefix("application/") in (
        ACCESS_TOKEN_TYPES
    )


def usable_subject(value: object) -> TypeGuard[str]:
    """Printable text that encodes as UTF-8 (no lone surrogate), of a bounded length, without
    spaces around it (``"prof-001 "`` would stand in the access log beside ``prof-001``)."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_SUBJECT_CHARS:
        return False
    if value != value.strip():
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return value.isprintable()


def _reason(exc: JOSEError) -> str:
    text = str(exc).lower()
    for needle, reason in (
        ("must be an integer", TIME_CLAIMS_REASON),
        ("invalid claim format", "token 'aud' must be text or a list of text"),
        ("jwt id must be", "token 'jti' must be text"),
        ("expired", "token has expired"),
        ("not yet valid", "token is not yet valid"),
        ("audience", "token audience is not accepted"),
        ("issuer", "token issuer is not accepted"),
        ("signature", "token signature does not verify"),
        ("subject must", SUBJECT_REASON),
        ("missing", "token lacks a required claim (exp, iat, iss, aud, sub)"),
        ("require", "token lacks a required claim (exp, iat, iss, aud, sub)"),
    ):
        if needle in text:
            return reason
    return "token is not acceptable"


# --- built-in development issuer -----------------------------------------------------------


def key_id(public_jwk: Mapping[str, Any]) -> str:
    """RFC 7638 thumbprint of the public key (base64url, no padding)."""
    members = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y")}[public_jwk["kty"]]
    canonical = json.dumps({m: public_jwk[m] for m in members}, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class DevIssuer:
    """Signs tokens with a locally generated key; only for the embedded default."""

    def __init__(
        self,
        *,
        private_pem: bytes,
        algorithm: str,
        issuer: str,
        audience: str,
        kid: str | None = None,
    ) -> None:
        self._private_pem = private_pem
        self.algorithm = algorithm
        self.issuer = issuer
        self.audience = audience
        public = jwk.construct(private_pem, algorithm).public_key().to_dict()
        public = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in public.items()}
        public["kid"] = kid or key_id(public)
        public["use"] = "sig"
        public["alg"] = algorithm
        self.public_jwk: dict[str, Any] = public

    @property
    def kid(self) -> str:
        return str(self.public_jwk["kid"])

    def __repr__(self) -> str:
        return f"DevIssuer(kid={self.kid!r}, key=***)"

    def mint(
        self,
        *,
        subject: str,
        roles: Sequence[str],
        roles_claim: str = "roles",
        ttl_seconds: int = 3600,
        extra_claims: Mapping[str, Any] | None = None,
    ) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": subject,
            "iat": now,
            "exp": now + ttl_seconds,
        }
        target = claims
        *parents, leaf = roles_claim.split(".")
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = list(roles)
        claims.update(extra_claims or {})
        return self.sign(claims)

    def sign(
        self, claims: Mapping[str, Any], *, extra_headers: Mapping[str, Any] | None = None
    ) -> str:
        """Sign exactly ``claims`` (no defaults added) under this issuer's key and ``kid``."""
        headers = {"kid": self.kid, **(extra_headers or {})}
        token: str = jwt.encode(
            dict(claims), self._private_pem.decode(), algorithm=self.algorithm, headers=headers
        )
        return token
