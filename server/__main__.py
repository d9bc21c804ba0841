import sys

if sys.argv[1:3] == ["backup", "replica"]:
    # The disaster-recovery path: a light parser of its own, without loading the server.
    import argparse

    from . import replica_cli

    parser = argparse.ArgumentParser(prog="python -m server backup")
    replica_cli.add_parser(parser.add_subparsers(dest="action", required=True))
    sys.exit(replica_cli.run(parser.parse_args(sys.argv[2:])))

from .cli import main

sys.exit(main())
