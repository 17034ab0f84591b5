"""Who may connect to the broker and what each may do: the credentials file, mosquitto's
password hash, and the topic rules, shared by the mosquitto generator
(``ingest.brokerconfig``) and the embedded broker (``ingest.broker``).

The rules (docs/operations.md, "Broker authentication"): a device (username = its id)
writes only under ``<prefix>/<its id>/#`` (its Will too) and reads only its own
``<prefix>/<its id>/cmd``; the ingest user reads ``<prefix>/#`` and writes
``<prefix>/+/cmd``; nobody else may do anything.

Errors: ``CredentialsError`` (a ``BrokerConfigError``): the credentials file is missing,
unreadable or malformed; the message says which file and what is wrong, never a password.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devices.topics import DEVICE_ID_RE
from ingest import BrokerConfigError

INGEST_USERNAME = "chargewatch-ingest"
"""The ingest user's default name: also its client id (mosquitto's
``use_username_as_clientid`` makes them one)."""

PBKDF2_ITERATIONS = 101
"""mosquitto_passwd's default for ``$7$`` (sha512-pbkdf2) in mosquitto 2.0."""
_SALT_BYTES = 12  # mosquitto 2.0's salt length (password_mosq.c SALT_LEN)


class CredentialsError(BrokerConfigError):
    pass


def new_password() -> str:
    """192 random bits, URL-safe: fits in ``mqtt://user:password@host`` as is."""
    return secrets.token_urlsafe(24)


def mosquitto_hash(password: str, salt: bytes | None = None) -> str:
    """mosquitto 2.0's password_file hash: ``$7$101$<base64 salt>$<base64 PBKDF2-SHA512>``."""
    salt = salt if salt is not None else os.urandom(_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, PBKDF2_ITERATIONS)
    return "$7${}${}${}".format(
        PBKDF2_ITERATIONS,
        base64.b64encode(salt).decode("ascii"),
        base64.b64encode(digest).decode("ascii"),
    )


def verify_mosquitto_hash(password: str, hashed: str) -> bool:
    """Whether ``password`` matches a ``$7$`` hash (ours or mosquitto_passwd's)."""
    try:
        _, kind, iterations, salt, digest = hashed.split("$")
        if kind != "7" or not 1 <= int(iterations) <= 10_000_000:
            return False
        expected = base64.b64decode(digest, validate=True)
        got = hashlib.pbkdf2_hmac(
            "sha512",
            password.encode("utf-8"),
            base64.b64decode(salt, validate=True),
            int(iterations),
        )
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(got, expected)


@dataclass(frozen=True, slots=True)
class Credentials:
    """``credentials.json``: ``{"ingest": {"username", "password"}, "devices": {id: password}}``."""

    ingest_username: str
    ingest_password: str = field(repr=False)
    devices: Mapping[str, str] = field(repr=False)

    def __post_init__(self) -> None:
        if self.ingest_username in self.devices:
            raise CredentialsError(
                f"the ingest username {self.ingest_username!r} is also a device id: choose"
                " another ingest username"
            )

    def password(self, username: str) -> str | None:
        if username == self.ingest_username:
            return self.ingest_password
        return self.devices.get(username)

    def check(self, username: str | None, password: str | None) -> bool:
        """The broker's question: is this the user's password (constant time)."""
        if not username or password is None:
            return False
        expected = self.password(username)
        if expected is None:
            hmac.compare_digest(password.encode(), password.encode())  # same work either way
            return False
        return hmac.compare_digest(password.encode("utf-8"), expected.encode("utf-8"))

    def to_json(self) -> str:
        return (
            json.dumps(
                {
                    "ingest": {"username": self.ingest_username, "password": self.ingest_password},
                    "devices": dict(sorted(self.devices.items())),
                },
                indent=2,
            )
            + "\n"
        )

    @classmethod
    def from_json(cls, text: str, source: str = "credentials") -> Credentials:
        try:
            data: Any = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CredentialsError(f"{source}: not JSON ({exc.msg}, line {exc.lineno})") from None
        ingest = data.get("ingest") if isinstance(data, dict) else None
        devices = data.get("devices") if isinstance(data, dict) else None
        if (
            not isinstance(ingest, dict)
            or not isinstance(ingest.get("username"), str)
            or not isinstance(ingest.get("password"), str)
            or not isinstance(devices, dict)
        ):
            raise CredentialsError(
                f'{source}: expected {{"ingest": {{"username": …, "password": …}},'
                ' "devices": {"<id>": "<password>", …}}'
            )
        for device_id, password in devices.items():
            if not DEVICE_ID_RE.match(device_id):
                raise CredentialsError(f"{source}: {device_id!r} is not a valid device id")
            if not isinstance(password, str) or not password:
                raise CredentialsError(f"{source}: device {device_id!r} has no password")
        if not DEVICE_ID_RE.match(ingest["username"]) or not ingest["password"]:
            raise CredentialsError(f"{source}: the ingest username or password is invalid")
        return cls(ingest["username"], ingest["password"], dict(devices))

    @classmethod
    def load(cls, path: Path) -> Credentials:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise CredentialsError(
                f"cannot read the credentials file {path}: {exc.strerror}"
            ) from None
        return cls.from_json(text, str(path))


def filter_within(requested: str, allowed: str) -> bool:
    """Whether every topic the filter ``requested`` matches is matched by ``allowed``
    (so a subscription to it can never deliver a topic outside ``allowed``)."""
    req, allow = requested.split("/"), allowed.split("/")
    for i, level in enumerate(allow):
        if level == "#":
            return True
        if i >= len(req):
            return False
        if level == "+":
            if req[i] == "#":
                return False
        elif req[i] != level:
            return False
    return len(req) == len(allow)


@dataclass(frozen=True, slots=True)
class TopicRules:
    """The broker's ACL, as mosquitto's acl file says it (``acl_text``) and as the embedded
    broker checks it (``may_publish``, ``may_subscribe``)."""

    prefix: str
    ingest_username: str

    def may_publish(self, username: str | None, topic: str) -> bool:
        if not username:
            return False
        if username == self.ingest_username:
            return filter_within(topic, f"{self.prefix}/+/cmd")
        if not DEVICE_ID_RE.match(username):
            return False
        return filter_within(topic, f"{self.prefix}/{username}/#")

    def may_subscribe(self, username: str | None, topic_filter: str) -> bool:
        """Also the check on each delivery: ``topic_filter`` may then be a plain topic."""
        if not username:
            return False
        if username == self.ingest_username:
            return filter_within(topic_filter, f"{self.prefix}/#")
        if not DEVICE_ID_RE.match(username):
            return False
        return filter_within(topic_filter, f"{self.prefix}/{username}/cmd")

    def acl_text(self) -> str:
        """mosquitto's acl_file. ``%u`` is the username; mosquitto 2.0 refuses to match a
        pattern for a username containing ``+``, ``#`` or ``/``."""
        p = self.prefix
        return "\n".join(
            [
                "# chargewatch: generated by `chargewatch broker-config mosquitto`",
                "# the ingest user: reads every device, writes commands",
                f"user {self.ingest_username}",
                f"topic read {p}/#",
                f"topic write {p}/+/cmd",
                "",
                "# every device (username = device id): writes under its own id only (its",
                "# Will too), reads only its own commands",
                f"pattern write {p}/%u/#",
                f"pattern read {p}/%u/cmd",
                "",
            ]
        )
