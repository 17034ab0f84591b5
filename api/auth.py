"""API keys for the maintenance endpoints: ``Authorization: Bearer cwk_<id>_<secret>``.

Keys are random (256 bits), so storing the SHA-256 of the secret is enough (a slow
password hash protects guessable secrets; these are not). Only the hash is kept, in the
data dir's SQLite file; the key itself is shown once, by ``chargewatch keys create``.
Roles: ``maintainer`` (alerts: read, acknowledge, resolve, notes, stream; dead letters)
and ``admin`` (everything, plus webhook subscriptions). Rider endpoints stay public.

401: no key, a malformed or unknown key, or a revoked one. 403: a valid key whose role
is not enough. Routes that take a key check it before their body is read
(``KeyFirstRoute``): a request without one is answered at once, whatever it uploads.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
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
from starlette.exceptions import HTTPException

from ingest.sqlite_db import SQLiteDB

ROLES = ("maintainer", "admin")
_RANK = {"maintainer": 0, "admin": 1}
DB_FILE = "chargewatch.db"
PREFIX = "cwk_"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, role TEXT NOT NULL, hash TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL, revoked_at_ms INTEGER
) WITHOUT ROWID;
"""


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    name: str
    role: str
    created_at_ms: int
    revoked_at_ms: int | None = None


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyStore:
    """Blocking; the API calls it from a worker thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db = SQLiteDB(self.path, _SCHEMA)

    @classmethod
    def in_dir(cls, data_dir: str | Path) -> KeyStore:
        return cls(Path(data_dir) / DB_FILE)

    def close(self) -> None:
        self._db.close()

    def create(self, name: str, role: str) -> tuple[ApiKey, str]:
        """A new key; returns it and the token (shown once, never stored)."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        key_id = secrets.token_hex(4)
        secret = secrets.token_urlsafe(32)
        key = ApiKey(key_id, name, role, time.time_ns() // 1_000_000)
        self._db.execute(
            "INSERT INTO api_keys VALUES (?,?,?,?,?,NULL)",
            (key.id, key.name, key.role, _hash(secret), key.created_at_ms),
        )
        return key, f"{PREFIX}{key_id}_{secret}"

    def list(self) -> list[ApiKey]:
        rows = self._db.query(
            "SELECT id, name, role, created_at_ms, revoked_at_ms FROM api_keys"
            " ORDER BY created_at_ms"
        )
        return [ApiKey(*row) for row in rows]

    def revoke(self, key_id: str) -> bool:
        cur = self._db.execute(
            "UPDATE api_keys SET revoked_at_ms = ? WHERE id = ? AND revoked_at_ms IS NULL",
            (time.time_ns() // 1_000_000, key_id),
        )
        return cur.rowcount > 0

    def verify(self, token: str) -> ApiKey | None:
        if not token.startswith(PREFIX):
            return None
        key_id, _, secret = token[len(PREFIX) :].partition("_")
        if not key_id or not secret:
            return None
        rows = self._db.query(
            "SELECT id, name, role, created_at_ms, revoked_at_ms, hash FROM api_keys WHERE id = ?",
            (key_id,),
        )
        row = rows[0] if rows else None
        if row is None or row[4] is not None:
            return None
        if not hmac.compare_digest(row[5], _hash(secret)):
            return None
        return ApiKey(*row[:5])


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
            key = await asyncio.to_thread(key_store(request).verify, token.strip())
            if key is None:
                raise _unauthorized("unknown or revoked API key")
        if _RANK[key.role] < _RANK[self.role]:
            raise HTTPException(403, f"this needs the {self.role} role; the key has {key.role}")
        request.scope[_VERIFIED] = key
        return key


def require(role: str) -> Require:
    return Require(role)


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
    actions = keys.add_subparsers(dest="keys_command", required=True)
    create = actions.add_parser("create", help="create a key and print it (once)")
    create.add_argument("--name", required=True, help="who or what uses it")
    create.add_argument("--role", choices=ROLES, default="maintainer")
    actions.add_parser("list", help="list keys (never the keys themselves)")
    revoke = actions.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("id")


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def cmd_keys(args: argparse.Namespace, data_dir: Path) -> int:
    store = KeyStore.in_dir(data_dir)
    try:
        if args.keys_command == "create":
            key, token = store.create(args.name, args.role)
            print(token)
            print(f"key {key.id} ({key.role}) for {key.name}: shown once, store it now")
            return 0
        if args.keys_command == "list":
            print(f"{'id':<10} {'role':<10} {'created':<20} {'revoked':<20} name")
            for key in store.list():
                print(
                    f"{key.id:<10} {key.role:<10} {_when(key.created_at_ms):<20}"
                    f" {_when(key.revoked_at_ms):<20} {key.name}"
                )
            return 0
        if store.revoke(args.id):
            print(f"key {args.id} revoked")
            return 0
        print(f"chargewatch: no active key with id {args.id!r}")
        return 1
    finally:
        store.close()
