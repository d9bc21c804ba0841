"""``python -m server backup replica restore``: a data directory rebuilt from the replica alone,
on a machine that has nothing else (issue 16). Kept apart from the rest of the CLI, and light
to import (``python -m server`` comes here without loading the server), so that a disaster
recovery starts at once."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def add_parser(actions: Any) -> None:
    replica = actions.add_parser("replica", help="the continuous replica (settings.backups.replication)")
    verbs = replica.add_subparsers(dest="replica_action", required=True, metavar="ACTION")
    rebuild = verbs.add_parser("restore", help="rebuild a data directory from the replica, at a moment")
    rebuild.add_argument("--from", dest="source", required=True, metavar="DIR|s3://BUCKET/PREFIX",
                         help="the replica: a local directory, or an S3 bucket and prefix (e.g. s3://b/replica)")
    rebuild.add_argument("--at", metavar="T", help="the moment (UTC 'YYYY-MM-DD HH:MM:SS.mmmZ' or ISO 8601; "
                         "default: the latest state)")
    rebuild.add_argument("--dir", required=True, metavar="NEW_PB_DATA",
                         help="the data directory to create (it must not exist, or be empty)")
    rebuild.add_argument("--lineage", help="restore from this lineage (default: the one that holds the moment)")
    rebuild.add_argument("--endpoint", default=os.environ.get("AWS_ENDPOINT_URL", ""),
                         help="S3 endpoint URL (default $AWS_ENDPOINT_URL, else AWS)")
    rebuild.add_argument("--region", default=os.environ.get("AWS_REGION", os.environ.get("AWS_DEFAULT_REGION", "")))
    rebuild.add_argument("--access-key", default=os.environ.get("AWS_ACCESS_KEY_ID", ""),
                         help="(default $AWS_ACCESS_KEY_ID)")
    rebuild.add_argument("--secret", default=os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
                         help="(default $AWS_SECRET_ACCESS_KEY; prefer the environment to a flag)")
    rebuild.add_argument("--force-path-style", action="store_true", help="path-style S3 addressing (MinIO, rclone)")
    rebuild.add_argument("--identity-file", metavar="KEY.txt",
                         help="the age identity of an encrypted replica (backups.encryption); '-': stdin")
    rebuild.add_argument("--json", action="store_true", help="print what was restored as JSON")


def run(args: argparse.Namespace) -> int:
    """``backup replica restore``: a new pb_data from the replica alone (a new machine)."""
    from .replication import restore as replica
    from .replication.client import FileClient, S3Client
    from .tools.times import format_datetime, parse_datetime

    at = None
    if args.at:
        moment = parse_datetime(args.at)
        if moment is None:
            print(f"Error: --at {args.at!r} is not a datetime", file=sys.stderr)
            return 2
        at = moment.timestamp()
    target = Path(args.dir)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        print(f"Error: {args.dir} exists and is not empty; name a new data directory", file=sys.stderr)
        return 1
    work = target.parent / f".{target.name}.replica_restore"
    try:
        if args.source.startswith("s3://"):
            from .storage.s3 import S3Config, S3Storage

            bucket, _, prefix = args.source[len("s3://"):].partition("/")
            prefix = prefix.strip("/")
            config = S3Config(bucket=bucket, region=args.region, endpoint=args.endpoint, access_key=args.access_key,
                              secret=args.secret, force_path_style=args.force_path_style)
            work.mkdir(parents=True, exist_ok=True)
            client: Any = S3Client(S3Storage(config, work), prefix + "/" if prefix else "")
        else:
            source = Path(args.source)
            if not source.is_dir():
                print(f"Error: no replica directory at {args.source}", file=sys.stderr)
                return 1
            client = FileClient(source)
        identities = None
        if args.identity_file:
            text = sys.stdin.read() if args.identity_file == "-" else Path(args.identity_file).read_text()
            from .backups import crypto

            identities = crypto.parse_identities(text)
        target.mkdir(parents=True, exist_ok=True)
        info = replica.restore_all(client, at, target, work / "fetch", args.lineage, identities)
        (target / "storage").mkdir(exist_ok=True)
    except BaseException as exc:
        shutil.rmtree(target, ignore_errors=True)  # nothing half-made is left behind
        if isinstance(exc, replica.ReplicaRestoreError) or type(exc).__name__ in ("IdentityError", "S3Error"):
            print(f"Error: {exc}", file=sys.stderr)
        elif isinstance(exc, OSError):
            print(f"Error: {exc.strerror or type(exc).__name__}", file=sys.stderr)
        elif isinstance(exc, Exception):
            print(f"Error: {type(exc).__name__}", file=sys.stderr)
        else:
            raise
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(info))
    else:
        data = info.get("data.db") or {}
        stamp = format_datetime(datetime.fromtimestamp(int(data.get("timestamp", 0)) / 1000, timezone.utc))
        print(f"Restored {args.dir} from lineage {info['lineage']}: data.db as of {stamp} (TXID {data.get('txid')}); "
              f"start it with: python -m server serve --dir {args.dir}")
    return 0
