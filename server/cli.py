"""``python -m server``: serve, manage superusers, and manage backups (``backup_cli``)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from . import backup_cli
from .app import opened
from .collections import SUPERUSERS
from .errors import ApiError
from .records import Requester
from .values import EMAIL_RE

DEFAULT_DIR = "./pb_data"
DEFAULT_HTTP = "127.0.0.1:8090"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m server", description="A PocketBase-style backend server.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="start the HTTP server", description="Start the HTTP server.")
    serve.add_argument("--http", default=DEFAULT_HTTP, metavar="ADDR", help=f"TCP address to listen on (default {DEFAULT_HTTP})")
    serve.add_argument("--dir", default=DEFAULT_DIR, help=f"the data directory (default {DEFAULT_DIR})")

    superuser = commands.add_parser("superuser", help="manage superusers", description="Manage superusers.")
    actions = superuser.add_subparsers(dest="action", required=True, metavar="ACTION")
    upsert = actions.add_parser("upsert", help="create a superuser, or change its password",
                                description="Create a superuser, or change the password of an existing one.")
    upsert.add_argument("email")
    upsert.add_argument("password")
    upsert.add_argument("--dir", default=DEFAULT_DIR, help=f"the data directory (default {DEFAULT_DIR})")
    delete = actions.add_parser("delete", help="delete a superuser", description="Delete a superuser.")
    delete.add_argument("email")
    delete.add_argument("--dir", default=DEFAULT_DIR, help=f"the data directory (default {DEFAULT_DIR})")
    backup_cli.add_parser(commands, DEFAULT_DIR)
    return parser


async def upsert_superuser(data_dir: str, email: str, password: str) -> str:
    if not EMAIL_RE.match(email):
        raise SystemExit(f"invalid email {email!r}")
    if len(password) < 8 or len(password.encode()) > 71:
        raise SystemExit("the password must be 8 to 71 bytes long")
    async with opened(data_dir) as app:
        collection = app.collections.get(SUPERUSERS)
        row = await app.records.find_auth_row(collection, email)
        if row is None:
            await app.records.insert_auth_record(collection, email, password)
        else:
            await app.records.set_password(collection, row["id"], password)
    return f'Successfully saved superuser "{email}"!'


async def delete_superuser(data_dir: str, email: str) -> tuple[str, int]:
    async with opened(data_dir) as app:
        collection = app.collections.get(SUPERUSERS)
        row = await app.records.find_auth_row(collection, email)
        if row is None:
            return f'superuser "{email}" is missing or already deleted', 0
        try:
            # The same path as the API's, with its rule that the last superuser stays.
            await app.records.delete(collection, row["id"], Requester(record=dict(row), collection=collection))
        except ApiError as exc:
            return exc.message, 1
    return f'Successfully deleted superuser "{email}"!', 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        from .serve import serve

        serve(args.http, args.dir)
        return 0
    if args.command == "backup":
        return backup_cli.run(args)
    if args.action == "upsert":
        print(asyncio.run(upsert_superuser(args.dir, args.email, args.password)))
        return 0
    message, code = asyncio.run(delete_superuser(args.dir, args.email))
    print(message, file=sys.stderr if code else sys.stdout)
    return code
