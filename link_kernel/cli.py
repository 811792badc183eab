"""``link-kernel``: install the kernelspec, manage hosts."""

from __future__ import annotations

import argparse
import sys

from . import __version__, kernelspec


def _install(args: argparse.Namespace) -> int:
    prefix = sys.prefix if args.sys_prefix else args.prefix
    path = kernelspec.install(
        user=args.user, prefix=prefix, name=args.name, display_name=args.display_name
    )
    print(f"Installed kernelspec {args.name!r} ({args.display_name}) in {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="link-kernel", description="Link (hybrid): run notebook cells locally or over SSH."
    )
    parser.add_argument("--version", action="version", version=f"link-kernel {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    install = commands.add_parser("install", help="install the 'Link (hybrid)' kernelspec")
    where = install.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="install for the current user")
    where.add_argument(
        "--sys-prefix", action="store_true", help="install into this environment (sys.prefix)"
    )
    where.add_argument("--prefix", metavar="P", help="install under prefix P")
    install.add_argument("--name", default=kernelspec.KERNEL_NAME, help="kernelspec name")
    install.add_argument(
        "--display-name", default=kernelspec.DISPLAY_NAME, help="name shown in notebook UIs"
    )
    install.set_defaults(func=_install)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
