"""API keys for the maintenance endpoints: ``Authorization: Bearer cwk_<id>_<secret>``.

Keys are random (256 bits), so storing the SHA-256 of the secret is enough (a slow
password hash protects guessable secrets; these are not). Only the hash is kept, in the
data dir's SQLite file (or PostgreSQL); the key itself is shown once, by ``chargewatch keys create``.
Roles: ``maintainer`` (alerts: read, acknowledge, resolve, notes, stream; dead letters;
the private fields of rider answers) and ``admin`` (everything, plus webhook
subscriptions, API keys and the audit log). Rider endpoints stay public.

A key may expire (``expires_at``); admins create, list and revoke keys over the API
(``api.routes.keys``) or with ``chargewatch keys``; each of those is in the audit log.

401: no key, a malformed or unknown key, a revoked or an expired one (the answer says
which). 403: a valid key whose role is not enough. Routes that take a key check it before
their body is read (``KeyFirstRoute``): a request without one is answered at once,
whatever it uploads.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import os
import re
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from sqlalchemy import bindparam, insert, select, update
from starlette.exceptions import HTTPException

from api.audit import Actor, AuditLog
from api.text import plain_text
from api.views import rfc3339
from ingest.db.database import Database
from ingest.db.schema import api_keys
from ingest.statedb import StateDB

ROLES = ("maintainer", "admin")
_RANK = {"maintainer": 0, "admin": 1}
PREFIX = "cwk_"

_K = api_keys.c
_COLUMNS = (_K.id, _K.name, _K.role, _K.created_at_ms, _K.revoked_at_ms, _K.expires_at_ms)
_CREATE = insert(api_keys)
_LIST = select(*_COLUMNS).order_by(_K.created_at_ms)
_REVOKE = (
    update(api_keys)
    .where(_K.id == bindparam("b_id"), _K.revoked_at_ms.is_(None))
    .values(revoked_at_ms=bindparam("b_at"))
)
_CHECK = select(_K.hash, *_COLUMNS).where(_K.id == bindparam("b_id"))
NAME_RULE = (
    "a key's name is shown as the actor of what it does: one line of visible characters,"
    " no control, bidi or invisible ones, no leading or trailing space"
)


class KeyRefused(Exception):
    """A token that admits no one: why, in words a client can act on."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    name: str
    role: str
    created_at_ms: int
    revoked_at_ms: int | None = None
    expires_at_ms: int | None = None

    @property
    def actor(self) -> Actor:
        return Actor(self.id, self.name, self.role)

    def view(self) -> dict[str, Any]:
        """What ``GET /v1/keys`` says of a key (never its token or hash)."""
        return {
            "id": self.id,
            "name": self.name,
            "role": self.role,
            "created_at": rfc3339(self.created_at_ms),
            "expires_at": rfc3339(self.expires_at_ms),
            "revoked_at": rfc3339(self.revoked_at_ms),
        }


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyStore:
    """Blocking; the API calls it from a worker thread. On a ``Database`` of the state
    store (``ingest.statedb``): serve's, a replica's, or the data dir's file (``in_dir``)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    @classmethod
    def in_dir(cls, data_dir: str | Path) -> KeyStore:
        return cls(StateDB.of(None, data_dir).database())

    def close(self) -> None:
        self._db.close()

    def create(self, name: str, role: str, expires_at_ms: int | None = None) -> tuple[ApiKey, str]:
        """A new key; returns it and the token (shown once, never stored)."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        if not name or plain_text(name) != name or "\n" in name:
            raise ValueError(NAME_RULE)
        now = _now_ms()
        if expires_at_ms is not None and expires_at_ms <= now:
            raise ValueError("expires_at must be in the future")
        key_id = secrets.token_hex(4)
        secret = secrets.token_urlsafe(32)
        key = ApiKey(key_id, name, role, now, None, expires_at_ms)
        self._db.execute(
            _CREATE,
            {
                "hash": _hash(secret),
                "id": key.id,
                "name": key.name,
                "role": key.role,
                "created_at_ms": key.created_at_ms,
                "revoked_at_ms": None,
                "expires_at_ms": expires_at_ms,
            },
        )
        return key, f"{PREFIX}{key_id}_{secret}"

    def list(self) -> list[ApiKey]:
        rows = self._db.query(_LIST)
        return [ApiKey(*row) for row in rows]

    def revoke(self, key_id: str) -> bool:
        done = self._db.execute(_REVOKE, {"b_id": key_id, "b_at": _now_ms()})
        return done.rowcount > 0

    def check(self, token: str, now_ms: int | None = None) -> ApiKey:
        """The key ``token`` names, if it admits anyone now; else ``KeyRefused``."""
        if not token.startswith(PREFIX):
            raise KeyRefused(f"not an API key (they start with {PREFIX})")
        key_id, _, secret = token[len(PREFIX) :].partition("_")
        if not key_id or not secret:
            raise KeyRefused("malformed API key")
        rows = self._db.query(_CHECK, {"b_id": key_id})
        # the secret is compared before anything about the key is said
        if not rows or not hmac.compare_digest(rows[0][0], _hash(secret)):
            raise KeyRefused("unknown API key")
        key = ApiKey(*rows[0][1:])
        if key.revoked_at_ms is not None:
            raise KeyRefused(f"this API key was revoked at {rfc3339(key.revoked_at_ms)}")
        now = _now_ms() if now_ms is None else now_ms
        if key.expires_at_ms is not None and key.expires_at_ms <= now:
            raise KeyRefused(f"this API key expired at {rfc3339(key.expires_at_ms)}")
        return key

    def verify(self, token: str) -> ApiKey | None:
        """The key, or None when ``token`` admits no one (``check`` says why)."""
        try:
            return self.check(token)
        except KeyRefused:
            return None


def key_store(request: Request) -> KeyStore:
    store: KeyStore = request.app.state.keys
    return store


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(401, detail, headers={"WWW-Authenticate": "Bearer"})


_VERIFIED = "chargewatch.api_key"  # scope key: the request's key, once checked


class Require:
    """The dependency that admits a key with at least ``role``. ``KeyFirstRoute`` finds it
    among a route's dependencies and runs it before the body is read; run again as a
    dependency, it returns the key that was checked then."""

    def __init__(self, role: str) -> None:
        self.role = role

    async def __call__(self, request: Request) -> ApiKey:
        key: ApiKey | None = request.scope.get(_VERIFIED)
        if key is None:
            header = request.headers.get("authorization")
            if header is None:
                raise _unauthorized("an API key is required: Authorization: Bearer <key>")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise _unauthorized("use Authorization: Bearer <key>")
            try:
                key = await asyncio.to_thread(key_store(request).check, token.strip())
            except KeyRefused as exc:
                raise _unauthorized(str(exc)) from None
        if _RANK[key.role] < _RANK[self.role]:
            raise HTTPException(403, f"this needs the {self.role} role; the key has {key.role}")
        request.scope[_VERIFIED] = key
        return key


def require(role: str) -> Require:
    return Require(role)


_MAINTAINER = Require("maintainer")


async def optional_maintainer(request: Request) -> ApiKey | None:
    """For public routes whose answers have private fields: None without an
    ``Authorization`` header (the public answer); the key when it is a good maintainer or
    admin key; 401/403 when a key is given but admits no one (a maintainer who sent a
    wrong key should hear so, not silently get the public answer)."""
    if "authorization" not in request.headers:
        return None
    return await _MAINTAINER(request)


def _required_role(dependant: Dependant) -> Require | None:
    for dep in dependant.dependencies:
        if isinstance(dep.call, Require):
            return dep.call
        found = _required_role(dep)
        if found is not None:
            return found
    return None


class KeyFirstRoute(APIRoute):
    """A route that checks its API key before FastAPI reads and parses the body (FastAPI
    reads the body first, then runs dependencies): a request without a good key is
    answered 401/403 at once, however large the body it announces (and the connection
    closed, ``api.limits.BodyLimit``)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        check = _required_role(self.dependant)
        if check is None:
            return handler

        async def key_first(request: Request) -> Response:
            await check(request)
            return await handler(request)

        return key_first


Maintainer = Annotated[ApiKey, Depends(require("maintainer"))]
Admin = Annotated[ApiKey, Depends(require("admin"))]


# -- chargewatch keys ----------------------------------------------------------------------


def add_keys_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = sub.add_parser("keys", help="API keys for the maintenance endpoints")
    keys.add_argument("--data-dir", type=Path, help="the service's data dir")
    keys.add_argument(
        "--db",
        default=os.environ.get("CHARGEWATCH_DB"),
        help="the service's state database, as serve's --db (default: $CHARGEWATCH_DB)",
    )
    actions = keys.add_subparsers(dest="keys_command", required=True)
    create = actions.add_parser("create", help="create a key and print it (once)")
    create.add_argument("--name", required=True, help="who or what uses it")
    create.add_argument("--role", choices=ROLES, default="maintainer")
    create.add_argument(
        "--expires",
        metavar="WHEN",
        help="when the key stops working: a duration (90d, 12h, 30m) or an RFC 3339 time",
    )
    actions.add_parser("list", help="list keys (never the keys themselves)")
    revoke = actions.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("id")


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_DURATION = re.compile(r"^(\d{1,6})([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
TTL_MAX_S = 10 * 366 * 86400
"""The longest a key may live: ten years (a key that should never end is given none)."""


def parse_expires(value: str, now_ms: int) -> int:
    """``--expires``: a duration from now (``90d``) or an RFC 3339 time -> epoch ms."""
    m = _DURATION.match(value.strip())
    if m is not None:
        seconds = int(m[1]) * _UNIT_S[m[2]]
        if not 0 < seconds <= TTL_MAX_S:
            raise ValueError("a key lives from 1 s to 10 years")
        return now_ms + seconds * 1000
    try:
        dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{value!r}: give a duration (90d, 12h) or an RFC 3339 time") from None
    if dt.tzinfo is None:
        raise ValueError(f"{value!r}: give an offset (Z or +08:00)")
    at = int(dt.timestamp() * 1000)
    if not now_ms < at <= now_ms + TTL_MAX_S * 1000:
        raise ValueError(f"{value!r}: must be in the future, at most 10 years from now")
    return at


def cmd_keys(
    args: argparse.Namespace, data_dir: Path, database: Callable[[], Database] | None = None
) -> int:
    """``chargewatch keys``: each change is in the audit log, the actor ``cli`` and the OS
    user who ran it. The stores on ``database()`` (serve's ``--db``), else in ``data_dir``."""
    store = KeyStore(database()) if database else KeyStore.in_dir(data_dir)
    audit = AuditLog(database()) if database else AuditLog.in_dir(data_dir)
    actor = Actor.cli()
    try:
        if args.keys_command == "create":
            expires = None
            if args.expires is not None:
                try:
                    expires = parse_expires(args.expires, _now_ms())
                except ValueError as exc:
                    print(f"chargewatch: --expires {exc}")
                    return 2
            try:
                key, token = store.create(args.name, args.role, expires)
            except ValueError as exc:
                print(f"chargewatch: --name: {exc}")
                return 2
            audit.record(actor, "key.create", key.id, {"name": key.name, "role": key.role,
                                                         "expires_at": rfc3339(expires)})  # fmt: skip
            print(token)
            until = f", expires {_when(expires)}" if expires is not None else ""
            print(f"key {key.id} ({key.role}) for {key.name}{until}: shown once, store it now")
            return 0
        if args.keys_command == "list":
            print(f"{'id':<10} {'role':<10} {'created':<20} {'expires':<20} {'revoked':<20} name")
            for key in store.list():
                print(
                    f"{key.id:<10} {key.role:<10} {_when(key.created_at_ms):<20}"
                    f" {_when(key.expires_at_ms):<20} {_when(key.revoked_at_ms):<20} {key.name}"
                )
            return 0
        if store.revoke(args.id):
            audit.record(actor, "key.revoke", args.id)
            print(f"key {args.id} revoked")
            return 0
        print(f"chargewatch: no active key with id {args.id!r}")
        return 1
    finally:
        audit.close()
        store.close()
