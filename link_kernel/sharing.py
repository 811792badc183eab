"""``link-kernel pipeline ...`` and ``link-kernel cache ...``: sharing with a team.

    link-kernel pipeline export NOTEBOOK -o FILE.json
    link-kernel pipeline import FILE.json NOTEBOOK
    link-kernel cache export NOTEBOOK [NAME...] -o FILE.tar.gz
    link-kernel cache import FILE.tar.gz

The parsers and their handlers; :func:`add_commands` hangs them on ``cli``'s
subparsers. The work is :mod:`link_kernel.pipeline.exchange` (the JSON file) and
:mod:`link_kernel.pipeline.archive` (the cache archive), imported when a command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _pipeline_export(args: argparse.Namespace) -> int:
    from .pipeline import exchange

    data = exchange.export_pipeline(args.notebook)
    exchange.write_atomic(Path(args.output), json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    names = [c["name"] for c in data["components"]]
    print(f"Exported {len(names)} component(s) of {args.notebook} to {args.output}: {', '.join(names)}")
    return 0


def _pipeline_import(args: argparse.Namespace) -> int:
    from .pipeline import exchange

    replaced, added = exchange.import_pipeline(args.file, args.notebook)
    print(
        f"Imported {args.file} into {args.notebook}: "
        f"{len(added)} added ({', '.join(added) or 'none'}), "
        f"{len(replaced)} replaced ({', '.join(replaced) or 'none'})"
    )
    return 0


def _cache_export(args: argparse.Namespace) -> int:
    from .pipeline import archive

    report = archive.export_cache(args.notebook, args.names, args.output, _cache())
    print(report.summary())
    return 0


def _cache_import(args: argparse.Namespace) -> int:
    from .pipeline import archive

    def warn(manifest: dict) -> None:
        print(archive.warning(manifest), file=sys.stderr)

    report = archive.import_cache(args.file, _cache(), on_manifest=warn)
    print(report.summary())
    return 0


def _cache():
    import os

    from .pipeline.cache import DEFAULT_LIMIT, Cache
    from .sync.variables import default_store

    limit = int(os.environ.get("LINK_CACHE_LIMIT", "0") or 0) or DEFAULT_LIMIT
    return Cache(default_store(), limit)


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``pipeline`` and ``cache`` to the ``link-kernel`` subcommands."""
    pipeline = commands.add_parser("pipeline", help="export or import a notebook's pipeline")
    sub = pipeline.add_subparsers(dest="pipeline_command", required=True)
    export = sub.add_parser("export", help="write the notebook's components to a JSON file")
    export.add_argument("notebook")
    export.add_argument("-o", "--output", required=True, metavar="FILE.json")
    export.set_defaults(func=_pipeline_export)
    load = sub.add_parser(
        "import", help="write a pipeline file's components into a notebook (new or existing)"
    )
    load.add_argument("file", metavar="FILE.json")
    load.add_argument("notebook")
    load.set_defaults(func=_pipeline_import)

    cache = commands.add_parser("cache", help="export or import pipeline cache entries")
    sub = cache.add_subparsers(dest="cache_command", required=True)
    export = sub.add_parser(
        "export", help="pack the cache entries of components (and their ancestors)"
    )
    export.add_argument("notebook")
    export.add_argument("names", nargs="*", metavar="NAME", help="components (default: all)")
    export.add_argument("-o", "--output", required=True, metavar="FILE.tar.gz")
    export.set_defaults(func=_cache_export)
    load = sub.add_parser(
        "import", help="verify an archive whole, then add its entries to your cache"
    )
    load.add_argument("file", metavar="FILE.tar.gz")
    load.set_defaults(func=_cache_import)
