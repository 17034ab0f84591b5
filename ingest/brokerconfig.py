"""``chargewatch broker-config mosquitto``: a mosquitto configuration that authenticates
every catalog device with its own password, generated from the catalog.

Writes into ``--out DIR`` (mode 0700):

- ``mosquitto.conf``: the listener(s), no anonymous clients, password and ACL files,
  persistence in DIR, queues sized for a store outage (``queued_messages``), and ``user``
  so that mosquitto started as root drops to the account that owns the files;
- ``passwd``: mosquitto 2.0's ``$7$`` hashes (0600);
- ``acl``: ``ingest.brokerauth.TopicRules.acl_text``;
- ``credentials.json`` (0600): every password in clear, for the devices' provisioning,
  ``chargewatch simulate --credentials`` and the ingest URL; owned by whoever ran this;
- with ``--tls``: ``ca.crt``/``ca.key`` and ``server.crt``/``server.key`` (kept when they
  exist, so devices keep trusting the same CA) and a TLS listener on ``--tls-port``.

Run again (``--rotate USER`` to give one user a new password): existing passwords are kept,
new catalog devices get one, removed ones lose theirs, and every file is replaced
atomically; ``kill -HUP`` makes mosquitto read them again. Nothing here prints a password.
"""

from __future__ import annotations

import argparse
import getpass
import math
import os
import pwd
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from devices.contract import DEFAULT_HEARTBEAT_S
from devices.topics import DEFAULT_PREFIX, TopicScheme
from ingest import BrokerConfigError
from ingest.brokerauth import (
    INGEST_USERNAME,
    Credentials,
    TopicRules,
    mosquitto_hash,
    new_password,
)

OUTAGE_HOURS = 4.0
"""Store outage the ingest session's broker queue holds by default. Not a whole night:
mosquitto 2.0 rewrites its whole snapshot at each save, so a long queue slows the broker
(~730 msg/s with 100,000 queued, docs/operations.md); longer outages want a broker that
logs each change (EMQX durable sessions, mosquitto 2.1's sqlite persistence)."""
MESSAGES_PER_DEVICE_HOUR = 3600 / DEFAULT_HEARTBEAT_S * 1.25
"""A status per heartbeat plus a quarter for events and changes: the shipped district
measured ~13 messages/s for 412 devices (~114 per device and hour, docs/operations.md)."""
MIN_QUEUED = 100_000


@dataclass(frozen=True, slots=True)
class MosquittoOptions:
    port: int = 1883
    bind: str | None = None  # None: every interface
    tls: bool = False
    tls_port: int = 8883
    tls_hosts: tuple[str, ...] = ()
    user: str | None = None  # None: "mosquitto" when run as root and it exists, else us
    prefix: str = DEFAULT_PREFIX
    outage_hours: float = OUTAGE_HOURS
    ingest_username: str = INGEST_USERNAME
    # a listener for the partitioned ingest workers only (None: none): see mosquitto_conf
    ingest_port: int | None = None

    def __post_init__(self) -> None:
        ports = [("--port", self.port)]
        if self.tls:
            ports.append(("--tls-port", self.tls_port))
        if self.ingest_port is not None:
            ports.append(("--ingest-port", self.ingest_port))
        for name, port in ports:
            if not 1 <= port <= 65535:
                raise BrokerConfigError(f"{name} {port}: must be 1..65535")
        if len({port for _, port in ports}) < len(ports):
            raise BrokerConfigError(f"{', '.join(n for n, _ in ports)} must all differ")
        if not 0 < self.outage_hours <= 24 * 30:
            raise BrokerConfigError("--outage-hours must be > 0 and at most 720")
        TopicScheme(self.prefix)  # raises ValueError with what is wrong


@dataclass(slots=True)
class Written:
    """What a run did, for the summary it prints (no passwords)."""

    out: Path
    devices: int
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    rotated: list[str] = field(default_factory=list)
    user: str = ""
    queued_messages: int = 0
    tls_created: bool = False


def queued_messages(devices: int, outage_hours: float) -> int:
    return max(MIN_QUEUED, math.ceil(devices * MESSAGES_PER_DEVICE_HOUR * outage_hours))


def _default_user() -> str:
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("mosquitto")
        except KeyError:
            return "root"
        return "mosquitto"
    return getpass.getuser()


class _Files:
    """Atomic writes with a mode and, run as root, an owner."""

    def __init__(self, out: Path, owner: tuple[int, int] | None) -> None:
        self.out = out
        self.owner = owner

    def write(self, name: str, data: bytes, mode: int, *, broker_reads: bool = True) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.out, prefix=f".{name}.")
        try:
            os.fchmod(fd, mode)
            if self.owner is not None and broker_reads:
                os.fchown(fd, *self.owner)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.out / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _credentials(
    old: Credentials | None, ids: list[str], rotate: Iterable[str], ingest_username: str
) -> tuple[Credentials, Written]:
    rotate = set(rotate)
    known = {*ids, ingest_username}
    unknown = sorted(rotate - known)
    if unknown:
        raise BrokerConfigError(
            f"--rotate: not a device of the catalog nor the ingest user: {', '.join(unknown)}"
        )
    old_devices = dict(old.devices) if old is not None else {}
    devices: dict[str, str] = {}
    written = Written(Path(), len(ids))
    for device_id in ids:
        if device_id in rotate or device_id not in old_devices:
            devices[device_id] = new_password()
            (written.rotated if device_id in old_devices else written.added).append(device_id)
        else:
            devices[device_id] = old_devices[device_id]
    written.removed = sorted(set(old_devices) - set(ids))
    if old is None or old.ingest_username != ingest_username or ingest_username in rotate:
        ingest_password = new_password()
        if old is not None:
            written.rotated.append(ingest_username)
    else:
        ingest_password = old.ingest_password
    return Credentials(ingest_username, ingest_password, devices), written


def generate(
    out: Path, device_ids: Iterable[str], options: MosquittoOptions, rotate: Iterable[str] = ()
) -> Written:
    """Write (or rewrite) the configuration for ``device_ids`` into ``out``."""
    from ingest import brokertls  # imported late: only --tls needs cryptography

    ids = sorted(device_ids)
    user = options.user or _default_user()
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        raise BrokerConfigError(f"--user {user!r}: no such account on this machine") from None
    as_root = os.geteuid() == 0
    if not as_root and account.pw_uid != os.geteuid():
        raise BrokerConfigError(
            f"--user {user!r}: only root can give the files to another account; run this as"
            f" root, or as {user!r}, or without --user"
        )
    owner = (account.pw_uid, account.pw_gid) if as_root else None
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    if owner is not None:
        os.chown(out, *owner)
    out = out.resolve()
    creds_path = out / "credentials.json"
    old = Credentials.load(creds_path) if creds_path.exists() else None
    creds, written = _credentials(old, ids, rotate, options.ingest_username)
    written.out, written.user = out, user
    written.queued_messages = queued_messages(len(ids), options.outage_hours)
    files = _Files(out, owner)

    if options.tls:
        hosts = list(dict.fromkeys([*brokertls.DEFAULT_HOSTS, *options.tls_hosts]))
        if not (out / "ca.crt").exists() or not (out / "ca.key").exists():
            ca = brokertls.make_ca()
            files.write("ca.key", ca.key, 0o600, broker_reads=False)
            files.write("ca.crt", ca.cert, 0o644)
            written.tls_created = True
        ca = brokertls.Pem((out / "ca.crt").read_bytes(), (out / "ca.key").read_bytes())
        server_crt = out / "server.crt"
        if (
            written.tls_created
            or not server_crt.exists()
            or not (out / "server.key").exists()
            or brokertls.server_hosts(server_crt.read_bytes()) != set(hosts)
        ):
            server = brokertls.make_server(ca, hosts)
            files.write("server.key", server.key, 0o600)
            files.write("server.crt", server.cert, 0o644)

    rules = TopicRules(options.prefix, creds.ingest_username)
    passwd = "".join(
        f"{username}:{mosquitto_hash(password)}\n"
        for username, password in [
            (creds.ingest_username, creds.ingest_password),
            *sorted(creds.devices.items()),
        ]
    )
    # credentials first: were we interrupted, the next run keeps what devices may have got
    files.write("credentials.json", creds.to_json().encode(), 0o600, broker_reads=False)
    files.write("passwd", passwd.encode(), 0o600)
    if options.ingest_port is not None:  # the ingest listener's: the ingest user alone
        files.write("passwd-ingest", passwd.splitlines(keepends=True)[0].encode(), 0o600)
    files.write("acl", rules.acl_text().encode(), 0o600)
    files.write("mosquitto.conf", mosquitto_conf(out, options, user, written).encode(), 0o600)
    return written


def mosquitto_conf(out: Path, options: MosquittoOptions, user: str, written: Written) -> str:
    bind = f" {options.bind}" if options.bind else ""
    per_listener = options.ingest_port is not None
    auth = [
        "allow_anonymous false",
        f"password_file {out}/passwd",
        f"acl_file {out}/acl",
    ]
    lines = [
        "# chargewatch: generated by `chargewatch broker-config mosquitto`; run it again to",
        "# change anything (every file here is rewritten), then `kill -HUP` mosquitto.",
        f"per_listener_settings {'true' if per_listener else 'false'}",
        "",
        "# a device's username is its id, and its client id is made the same (an option of",
        "# each listener), so that one device cannot take over another's connection",
        f"listener {options.port}{bind}",
        "protocol mqtt",
        "use_username_as_clientid true",
        *(auth if per_listener else []),
    ]
    if options.tls:
        lines += [
            "",
            "# TLS for a test deployment: the CA in ca.crt signed server.crt",
            f"listener {options.tls_port}{bind}",
            "protocol mqtt",
            "use_username_as_clientid true",
            f"cafile {out}/ca.crt",
            f"certfile {out}/server.crt",
            f"keyfile {out}/server.key",
            "tls_version tlsv1.2",
            *(auth if per_listener else []),
        ]
    if per_listener:
        lines += [
            "",
            "# the partitioned ingest workers (`chargewatch ingest`): one persistent session per",
            "# partition, each with its own client id, all as the ingest user, who alone may log",
            "# in here (passwd-ingest); keep this port off the devices' network",
            f"listener {options.ingest_port}{bind}",
            "protocol mqtt",
            "allow_anonymous false",
            f"password_file {out}/passwd-ingest",
            f"acl_file {out}/acl",
        ]
    else:
        lines += ["", "# every client authenticates, on every listener", *auth]
    lines += [
        "",
        "# started as root, mosquitto switches to this account, which owns these files (and",
        "# reads them again on SIGHUP); started as that account it stays so",
        f"user {user}",
        "",
        "# the ingest session's queue is the spool while the store is down: kept on disk",
        "# (a snapshot after every 100 changes and at shutdown: a crash loses at most those;",
        "# a snapshot every N seconds lost a whole ingest session) and sized for",
        f"# {options.outage_hours:g} h of {written.devices} devices"
        f" (~{MESSAGES_PER_DEVICE_HOUR:.0f} messages per device and hour)",
        "persistence true",
        f"persistence_location {out}/",
        "autosave_on_changes true",
        "autosave_interval 100",
        f"max_queued_messages {written.queued_messages}",
        "# and 1 GiB of memory at most, whatever the message sizes",
        "max_queued_bytes 1073741824",
        "# QoS 1 in flight to the ingest session (the default 20 throttles it)",
        "max_inflight_messages 1000",
        "# the contract's 16 KiB payload, its topic and header",
        "max_packet_size 17408",
        "",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        "",
    ]
    return "\n".join(lines)


# -- the command --------------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bc = sub.add_parser(
        "broker-config", help="broker configuration authenticating every catalog device"
    )
    kinds = bc.add_subparsers(dest="broker_kind", required=True)
    m = kinds.add_parser(
        "mosquitto",
        help="mosquitto.conf, passwd, acl and credentials.json for the catalog",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m.add_argument("--out", type=Path, required=True, metavar="DIR", help="where to write")
    m.add_argument("--catalog", type=Path, help="site catalog JSON; default: the district")
    m.add_argument("--port", type=int, default=1883, help="the MQTT listener (default 1883)")
    m.add_argument("--bind", metavar="ADDR", help="listen address (default: all interfaces)")
    m.add_argument(
        "--tls", action="store_true", help="a test CA, a server certificate and a TLS listener"
    )
    m.add_argument("--tls-port", type=int, default=8883, help="the TLS listener (default 8883)")
    m.add_argument(
        "--tls-host",
        action="append",
        default=[],
        metavar="NAME",
        help="another name or address for the server certificate (repeatable; localhost and"
        " 127.0.0.1 are always in it)",
    )
    m.add_argument(
        "--rotate",
        action="append",
        default=[],
        metavar="USER",
        help="a new password for this device id (or the ingest user); repeatable",
    )
    m.add_argument(
        "--user",
        help="the account mosquitto runs as and that owns the files (default: mosquitto when"
        " run as root, else you)",
    )
    m.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"topic prefix ({DEFAULT_PREFIX})")
    m.add_argument(
        "--outage-hours",
        type=float,
        default=OUTAGE_HOURS,
        help=f"store outage the ingest queue holds (default {OUTAGE_HOURS:g})",
    )
    m.add_argument("--ingest-username", default=INGEST_USERNAME, help=f"default {INGEST_USERNAME}")
    m.add_argument(
        "--ingest-port",
        type=int,
        metavar="PORT",
        help="a listener for the partitioned ingest workers only (`chargewatch ingest`: one"
        " session per partition, each choosing its client id); default: none",
    )


def command(args: argparse.Namespace) -> int:
    from devices.catalog import Catalog, CatalogError

    try:
        catalog = Catalog.load(args.catalog)
        options = MosquittoOptions(
            port=args.port,
            bind=args.bind,
            tls=args.tls,
            tls_port=args.tls_port,
            tls_hosts=tuple(args.tls_host),
            user=args.user,
            prefix=args.prefix,
            outage_hours=args.outage_hours,
            ingest_username=args.ingest_username,
            ingest_port=args.ingest_port,
        )
        written = generate(args.out, catalog.devices, options, args.rotate)
    except (CatalogError, BrokerConfigError, ValueError) as exc:
        raise SystemExit(f"chargewatch broker-config: {exc}") from None
    except OSError as exc:
        raise SystemExit(f"chargewatch broker-config: {exc.filename}: {exc.strerror}") from None
    out = written.out
    print(f"wrote {out}/mosquitto.conf, passwd, acl, credentials.json (0600)")
    print(
        f"{written.devices} devices: {len(written.added)} new, {len(written.rotated)} rotated"
        f"{' (' + ', '.join(written.rotated) + ')' if written.rotated else ''},"
        f" {len(written.removed)} removed"
    )
    if written.tls_created:
        print(f"created a test CA ({out}/ca.crt) and a server certificate")
    print(
        f"mosquitto runs as {written.user!r}; queue for the ingest session: {written.queued_messages}"
    )
    print(f"start: mosquitto -c {out}/mosquitto.conf    after a change: kill -HUP <its pid>")
    print(
        f"ingest: mqtt://{args.ingest_username}:<ingest.password from credentials.json>@HOST:{args.port}"
    )
    if args.ingest_port is not None:
        print(
            f"partitioned ingest workers (chargewatch ingest): the same user, port {args.ingest_port}"
        )
    return 0
