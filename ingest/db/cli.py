"""``chargewatch db upgrade --db URL`` (or ``CHARGEWATCH_DB``): migrate a database to this
chargewatch's schema and seed an empty device registry from the catalog; ``db status``
says where a database stands. Exit codes: 0 done (status: current), 1 it could not be done
(status: behind or ahead), 2 usage."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from devices.catalog import Catalog, CatalogError
from ingest import StoreError
from ingest.db import migrate, registry

ENV = "CHARGEWATCH_DB"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    db = sub.add_parser("db", help="migrate or check the state database (SQLite or PostgreSQL)")
    actions = db.add_subparsers(dest="db_command", required=True)
    for name, text in (
        ("upgrade", "migrate to this chargewatch's schema; seed an empty device registry"),
        ("status", "the database's revision against this chargewatch's"),
    ):
        p = actions.add_parser(name, help=text)
        p.add_argument(
            "--db",
            default=os.environ.get(ENV),
            help=f"postgresql://user@host/db or sqlite:///path (default: ${ENV})",
        )
        if name == "upgrade":
            p.add_argument(
                "--catalog", help="catalog JSON for an empty registry (default: shipped)"
            )


def cmd_db(args: argparse.Namespace) -> int:
    if not args.db:
        print(f"chargewatch db: no database: give --db URL or set {ENV}", file=sys.stderr)
        return 2
    try:
        if args.db_command == "status":
            return _status(args.db)
        return upgrade(args.db, args.catalog)
    except (StoreError, CatalogError) as exc:
        print(f"chargewatch db {args.db_command}: {exc}", file=sys.stderr)
        return 1


def _status(url: str) -> int:
    rev = migrate.revision_of(url)
    print(f"{migrate.shown(url)}: revision {rev or 'none'}, this chargewatch: {migrate.head()}")
    migrate.ensure_current(url)
    return 0


def upgrade(url: str, catalog_path: str | None) -> int:
    """``db upgrade``: migrate, then seed an empty registry from the catalog (the shipped one
    when ``catalog_path`` is None); says what it did on stdout."""
    catalog = Catalog.load(catalog_path)  # a bad catalog is refused before anything changes
    target = migrate.engine_url(url)
    if target.startswith("sqlite:///"):
        from ingest.sqlite_db import private_file

        private_file(Path(target.removeprefix("sqlite:///")))  # 0600, in a 0700 directory
    before = migrate.revision_of(url)
    after = migrate.upgrade(url)
    print(f"{migrate.shown(url)}: revision {before or 'none'} -> {after}")
    engine = migrate.connect(url)
    try:
        with engine.begin() as conn:
            if registry.count(conn) == 0:
                n_stations, n_devices = registry.import_catalog(conn, catalog)
                print(f"registry: {n_stations} stations, {n_devices} devices from {catalog.source}")
    finally:
        engine.dispose()
    return 0
