"""``link-kernel``: install the kernelspec, manage hosts.

    link-kernel install [--user | --sys-prefix | --prefix P] [--name N] [--display-name D]
    link-kernel hosts add ALIAS [user@]HOST[:PORT] [--identity F] [--python PATH]
                          [--workdir DIR] [--kernel NAME] [--accept-new-host-key]
    link-kernel hosts add ALIAS --process [--workdir DIR]
        either form, for a Slurm login node: --slurm [--partition P] [--gpus N]
                          [--cpus N] [--mem M] [--time T]
    link-kernel hosts list | remove ALIAS | kernels ALIAS | check ALIAS
    link-kernel git install [--global] [--attributes-file] | uninstall [--global] | status
    link-kernel git log NOTEBOOK
    link-kernel git merge-driver BASE OURS THEIRS PATH | textconv FILE   (what git runs)
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

from . import __version__, hosts, kernelspec
from .errors import LinkError, UnknownHostKeyError


def _install(args: argparse.Namespace) -> int:
    prefix = sys.prefix if args.sys_prefix else args.prefix
    path = kernelspec.install(
        user=args.user, prefix=prefix, name=args.name, display_name=args.display_name
    )
    print(f"Installed kernelspec {args.name!r} ({args.display_name}) in {path}")
    return 0


_TARGET = re.compile(r"(?:(?P<user>[^@]+)@)?(?P<host>\[[^\]]+\]|[^:]+)(?::(?P<port>\d+))?")


def parse_target(text: str) -> tuple[str, str, int]:
    """``[user@]HOST[:PORT]`` -> (user, host, port); 0 means the default port."""
    match = _TARGET.fullmatch(text)
    if not match:
        msg = f"bad host {text!r}: write [user@]HOST[:PORT]"
        raise LinkError(msg)
    host = match["host"].strip("[]")
    return match["user"] or "", host, int(match["port"] or 0)


def _slurm_settings(args: argparse.Namespace) -> dict:
    """The Slurm settings of ``hosts add``; resource defaults only with --slurm."""
    from .routing import RESOURCE_OPTIONS

    given = {k: getattr(args, k) for k in RESOURCE_OPTIONS if getattr(args, k)}
    if given and not args.slurm:
        options = " ".join(f"--{k}" for k in given)
        msg = f"{options} only apply to a Slurm host: add --slurm"
        raise LinkError(msg)
    return {"slurm": True, **given} if args.slurm else {}


def _hosts_add(args: argparse.Namespace) -> int:
    known = hosts.load_registry()
    slurm = _slurm_settings(args)
    if args.process:
        config = hosts.HostConfig(
            alias=args.alias, transport="process", workdir=args.workdir or "", **slurm
        )
    else:
        if not args.target:
            msg = "give the host as [user@]HOST[:PORT], or --process for this machine"
            raise LinkError(msg)
        user, hostname, port = parse_target(args.target)
        config = hosts.HostConfig(
            alias=args.alias,
            transport="ssh",
            hostname=hostname,
            port=port,
            user=user,
            identity=args.identity or "",
            python=args.python or "",
            workdir=args.workdir or "",
            kernel=args.kernel or "",
            ssh_config=args.ssh_config or "",
            known_hosts=args.known_hosts or "",
            **slurm,
        )
        _trust_host_key(config, accept=args.accept_new_host_key)
    if not args.no_check:
        config = _run_async(_complete(config))
    known[config.alias] = config
    path = hosts.save_registry(known)
    print(f"Added host {config.alias!r}: {config.summary()}\nRegistry: {path}")
    return 0


def _trust_host_key(config: hosts.HostConfig, *, accept: bool) -> None:
    """Show an unknown host's key; record it only when the user accepts it."""
    from .transports import ssh

    target = ssh.SSHHost.resolve(
        config.alias,
        ssh_config=config.ssh_config or None,
        hostname=config.hostname or None,
        port=config.port or None,
        user=config.user or None,
        identity=config.identity or None,
        known_hosts=config.known_hosts or None,
    )
    connection = ssh.SSHConnection(target)
    try:
        connection.connect()
        return
    except UnknownHostKeyError as err:
        fingerprint = err.fingerprint
    finally:
        connection.close()
    port = target.port
    print(f"The host {target.hostname}:{port} is not in known_hosts; its key is {fingerprint}.")
    if not accept:
        if not sys.stdin.isatty():
            msg = f"host key of {target.hostname} not trusted yet ({fingerprint})"
            raise LinkError(
                msg, hint="Check the fingerprint, then rerun with --accept-new-host-key."
            )
        answer = input("Trust this key and record it in known_hosts? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            msg = "host key not accepted; nothing was recorded"
            raise LinkError(msg)
    key = ssh.fetch_host_key(target.hostname, port)
    if ssh.fingerprint(key) != fingerprint:
        msg = "the host presented a different key on the second connection; nothing was recorded"
        raise LinkError(msg)
    path = target.known_hosts_files[0]
    ssh.add_known_host(path, target.hostname, port, key)
    print(f"Recorded {fingerprint} for {target.hostname}:{port} in {path}")


async def _complete(config: hosts.HostConfig) -> hosts.HostConfig:
    """Connect once; fill in the host's python when none was given; find srun."""
    from .slurm import find_commands
    from .transports.factory import make_transport

    transport = make_transport(config, os.getcwd())
    try:
        await transport.connect()
        if not config.python and config.transport == "ssh":
            config.python = await transport.default_python()
        if config.slurm:
            await find_commands(transport)
    finally:
        await transport.close()
    return config


def _hosts_list(args: argparse.Namespace) -> int:
    known = hosts.load()
    width = max(len(a) for a in known)
    for alias in sorted(known):
        host = known[alias]
        print(f"{alias:<{width}}  {host.summary()}  ({host.source})")
    return 0


def _hosts_remove(args: argparse.Namespace) -> int:
    known = hosts.load_registry()
    if args.alias not in known:
        msg = f"no host {args.alias!r} in the registry; registered: {', '.join(sorted(known)) or 'none'}"
        raise LinkError(msg)
    del known[args.alias]
    hosts.save_registry(known)
    print(f"Removed host {args.alias!r}")
    return 0


def _host(alias: str) -> hosts.HostConfig:
    known = hosts.load()
    if alias not in known:
        from .errors import UnknownTargetError

        raise UnknownTargetError(alias, sorted(known))
    return known[alias]


def _hosts_kernels(args: argparse.Namespace) -> int:
    from .transports.factory import make_transport

    async def run() -> dict:
        transport = make_transport(_host(args.alias), os.getcwd())
        try:
            await transport.connect()
            return await transport.kernelspecs(_host(args.alias).python or None)
        finally:
            await transport.close()

    specs = _run_async(run())
    for name in sorted(specs):
        spec = specs[name]
        print(f"{name:<20} {spec.get('display_name', '')}  [{spec.get('argv', [''])[0]}]")
    if not specs:
        print(f"no kernelspecs on {args.alias}")
    return 0


def _hosts_check(args: argparse.Namespace) -> int:
    import zmq

    from .backends.remote import RemoteBackend
    from .relay import NullRelay

    async def run() -> None:
        host = _host(args.alias)
        context = zmq.Context()
        backend = RemoteBackend(
            host, local_dir=os.getcwd(), context=context, relay=NullRelay(), sync=None
        )
        timings: dict[str, float] = {}
        try:
            kernel = await backend.start_kernel(timings)
            t0 = time.perf_counter()
            reply = await kernel.conn.request(
                "execute_request",
                {"code": "1+1", "silent": False, "store_history": False, "user_expressions":
                 {"r": "1+1"}, "allow_stdin": False, "stop_on_error": True},
                timeout=30,
            )
            timings["run 1+1"] = time.perf_counter() - t0
            value = reply["content"]["user_expressions"]["r"]["data"]["text/plain"]
            t1 = time.perf_counter()
            step = await backend._release(kernel)
            timings["stop"] = time.perf_counter() - t1
        finally:
            await backend.shutdown()
            context.term()
        print(f"{args.alias}: {host.summary()}")
        width = max(map(len, timings), default=8)
        for name, seconds in timings.items():
            print(f"  {name:<{width}} {seconds * 1000:8.1f} ms")
        print(f"  1+1 = {value}; stopped by {step.value}")

    _run_async(run())
    return 0


# -- git: notebooks merge and diff cell by cell (link_kernel.notebook_git) ---------------


def _git_install(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .notebook_git import install

    path, notes = install.install(Path.cwd(), global_=args.global_, shared=args.attributes_file)
    where = "global git config" if args.global_ else "this repository's git config"
    print(f"Registered the {install.DRIVER} merge driver and diff in {where}")
    print(f"Notebooks use them through {path}: {install.LINE}")
    for note in notes:
        print(f"note: {note}")
    return 0


def _git_uninstall(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .notebook_git import install

    changed = install.uninstall(Path.cwd(), global_=args.global_)
    print(f"Removed the {install.DRIVER} merge driver and diff settings")
    for path in changed:
        print(f"Removed the *.ipynb line from {path}")
    return 0


def _git_status(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .notebook_git import install

    state = install.status(Path.cwd())
    print("installed" if state.installed else "not installed")
    for key, value in state.settings.items():
        print(f"  {key} = {value}")
    for path in state.attributes:
        print(f"  {path}: {install.LINE}")
    for attribute, value in state.effective.items():
        ours = value == install.DRIVER
        print(f"  a notebook here gets {attribute}={value}" + ("" if ours else f" (not {install.DRIVER})"))
    for note in state.others:
        print(f"note: {note}")
    return 0


def _git_log(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .notebook_git import history

    print(history.format_log(history.log(Path(args.notebook), Path.cwd())), end="")
    return 0


def _git_merge_driver(args: argparse.Namespace) -> int:
    from .notebook_git import driver

    return driver.merge_driver(args.base, args.ours, args.theirs, args.path)


def _git_textconv(args: argparse.Namespace) -> int:
    from .notebook_git import driver

    return driver.textconv(args.file)


def _add_git_commands(commands: argparse._SubParsersAction) -> None:
    git = commands.add_parser("git", help="merge and diff notebooks cell by cell in git")
    sub = git.add_subparsers(dest="git_command", required=True)
    install = sub.add_parser("install", help="register the notebook merge driver and diff")
    install.add_argument("--global", dest="global_", action="store_true",
                         help="in the global git config and attributes file")
    install.add_argument("--attributes-file", action="store_true",
                         help="write .gitattributes (shared) instead of .git/info/attributes")
    install.set_defaults(func=_git_install)
    uninstall = sub.add_parser("uninstall", help="remove what 'git install' wrote")
    uninstall.add_argument("--global", dest="global_", action="store_true")
    uninstall.set_defaults(func=_git_uninstall)
    sub.add_parser("status", help="what is installed").set_defaults(func=_git_status)
    log = sub.add_parser("log", help="per commit: components added, removed, renamed, ...")
    log.add_argument("notebook")
    log.set_defaults(func=_git_log)
    driver = sub.add_parser("merge-driver", help="git runs this: merge %%O %%A %%B %%P")
    for name in ("base", "ours", "theirs", "path"):
        driver.add_argument(name)
    driver.set_defaults(func=_git_merge_driver)
    textconv = sub.add_parser("textconv", help="git runs this: a notebook as cells")
    textconv.add_argument("file")
    textconv.set_defaults(func=_git_textconv)


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

    host_cmds = commands.add_parser("hosts", help="manage the hosts remote cells run on")
    sub = host_cmds.add_subparsers(dest="hosts_command", required=True)
    add = sub.add_parser("add", help="register a host")
    add.add_argument("alias")
    add.add_argument("target", nargs="?", help="[user@]HOST[:PORT]")
    add.add_argument("--process", action="store_true", help="this machine, a process per cell")
    add.add_argument("--identity", metavar="F", help="private key file")
    add.add_argument("--python", metavar="PATH", help="the host's python (absolute path)")
    add.add_argument("--workdir", metavar="DIR", help="work directory on the host")
    add.add_argument("--kernel", metavar="NAME", help="kernelspec on the host to run cells with")
    add.add_argument("--ssh-config", metavar="F", help="ssh config file (default ~/.ssh/config)")
    add.add_argument("--known-hosts", metavar="F", help="known_hosts file")
    add.add_argument("--accept-new-host-key", action="store_true",
                     help="record an unknown host key without asking")
    add.add_argument("--no-check", action="store_true", help="do not connect to the host")
    add.add_argument("--slurm", action="store_true",
                     help="a Slurm login node: each cell's kernel is a job started with srun")
    add.add_argument("--partition", metavar="P", help="Slurm partition (default: the cluster's)")
    add.add_argument("--gpus", metavar="N", help="GPUs per cell unless a cell says gpus=")
    add.add_argument("--cpus", metavar="N", help="CPUs per cell unless a cell says cpus=")
    add.add_argument("--mem", metavar="M", help="memory per cell (32G) unless a cell says mem=")
    add.add_argument("--time", metavar="T", help="time limit per cell (2:00:00) unless time=")
    add.set_defaults(func=_hosts_add)
    sub.add_parser("list", help="list known hosts").set_defaults(func=_hosts_list)
    remove = sub.add_parser("remove", help="remove a host from the registry")
    remove.add_argument("alias")
    remove.set_defaults(func=_hosts_remove)
    kernels = sub.add_parser("kernels", help="list the host's kernelspecs")
    kernels.add_argument("alias")
    kernels.set_defaults(func=_hosts_kernels)
    check = sub.add_parser("check", help="connect, start a kernel, run 1+1, stop; time each step")
    check.add_argument("alias")
    check.set_defaults(func=_hosts_check)

    from .sharing import add_commands as add_sharing_commands

    add_sharing_commands(commands)  # pipeline export|import, cache export|import
    _add_git_commands(commands)
    return parser


def _run_async(coroutine):
    """``asyncio.run``, imported only by the commands that need it: git runs this
    program once per notebook it merges or diffs, and asyncio costs 40 ms."""
    import asyncio

    return asyncio.run(coroutine)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LinkError as err:
        print(f"link-kernel: {type(err).__name__}: {err.message}", file=sys.stderr)
        if err.hint:
            print(f"hint: {err.hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
