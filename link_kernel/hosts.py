"""The host registry: where remote cells can run.

A host is an alias with settings. Aliases come from three places, the later
winning: the built-in ``process`` host (this machine, a fresh kernel process
per cell), every ``Host`` of ``~/.ssh/config`` (default settings), and the
registry file that ``link-kernel hosts add`` writes, a human-editable TOML
file under the Jupyter config directory::

    # ~/.jupyter/link/hosts.toml
    [hosts.gpu]
    transport = "ssh"
    hostname = "gpu.example.org"
    user = "ada"
    port = 22
    identity = "~/.ssh/id_ed25519"
    python = "/opt/conda/bin/python"
    workdir = "~/link-work/project"
    cache = "~/.cache/link-kernel/host-blobs"

    [hosts.cluster]             # a login node whose cells run as Slurm jobs
    transport = "ssh"
    hostname = "login.example.org"
    slurm = true
    partition = "gpu"
    gpus = "1"                  # default resources; a cell's gpus= cpus= mem= time= win

Loading is pure: :func:`load` reads files, it connects to nothing.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import HostConfigError, LinkError
from .routing import RESOURCE_OPTIONS, resource_value

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PROCESS = "process"
TRANSPORTS = ("ssh", "process")
_ALIAS = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@+-]*")


@dataclass
class HostConfig:
    """One host's settings. Empty strings mean "the default"."""

    alias: str
    transport: str = "ssh"
    hostname: str = ""
    port: int = 0
    user: str = ""
    identity: str = ""
    python: str = ""
    workdir: str = ""
    cache: str = ""
    kernel: str = ""
    ssh_config: str = ""
    known_hosts: str = ""
    standby: bool = True
    #: GiB of the last cell's data (its big inputs and outputs) a standby holds ready;
    #: 0 holds none. The host's own limit is half its available memory.
    standby_data: float = 4.0
    idle_timeout: float = 600.0
    #: Kernels are forked from a fork server on the host that has ipykernel and the
    #: notebook's modules imported (off: each kernel is a fresh interpreter).
    fork_server: bool = True
    #: Cells run as Slurm jobs started with ``srun`` on this host (a login node).
    slurm: bool = False
    #: Default Slurm resources (strings as in a routing comment); a cell's own win.
    partition: str = ""
    gpus: str = ""
    cpus: str = ""
    mem: str = ""
    time: str = ""
    source: str = field(default="registry", compare=False)

    def __post_init__(self) -> None:
        if not _ALIAS.fullmatch(self.alias) or self.alias == "local":
            msg = f"bad host alias {self.alias!r}: use letters, digits, '_', '.', '-' (not 'local')"
            raise HostConfigError(msg)
        if self.transport not in TRANSPORTS:
            msg = f"host {self.alias!r}: transport {self.transport!r} is not one of {TRANSPORTS}"
            raise HostConfigError(msg)
        data = self.standby_data
        if isinstance(data, bool) or not isinstance(data, (int, float)) or data < 0:
            msg = f"host {self.alias!r}: standby_data is GiB, a number >= 0 (got {self.standby_data!r})"
            raise HostConfigError(msg)
        defaults = self.slurm_defaults()
        if defaults and not self.slurm:
            msg = (
                f"host {self.alias!r}: {', '.join(f'{k}={v}' for k, v in defaults.items())} "
                "needs slurm = true"
            )
            raise HostConfigError(msg)
        for key, value in defaults.items():
            try:
                resource_value(key, value)
            except LinkError as exc:
                raise HostConfigError(f"host {self.alias!r}: {exc.message}") from exc

    def slurm_defaults(self) -> dict[str, str]:
        """The host's default Slurm resources that are set."""
        return {k: getattr(self, k) for k in RESOURCE_OPTIONS if getattr(self, k)}

    @property
    def keeps_standby(self) -> bool:
        """Warm standby is off on Slurm hosts: an idle job would hold its GPU."""
        return self.standby and not self.slurm

    @property
    def forks_kernels(self) -> bool:
        """No fork server on Slurm hosts: each job runs on a node chosen for it."""
        return self.fork_server and not self.slurm

    def to_toml(self) -> str:
        lines = [f"[hosts.{_toml_key(self.alias)}]"]
        defaults = HostConfig(alias=self.alias)
        for f in fields(self):
            if f.name in ("alias", "source"):
                continue
            value = getattr(self, f.name)
            if f.name == "transport" or value != getattr(defaults, f.name):
                lines.append(f"{f.name} = {_toml_value(value)}")
        return "\n".join(lines)

    def summary(self) -> str:
        if self.transport == PROCESS:
            text = f"process on this machine, workdir {self.workdir or '(default)'}"
        else:
            target = f"{self.user + '@' if self.user else ''}{self.hostname or self.alias}"
            if self.port:
                target += f":{self.port}"
            text = f"ssh {target}, python {self.python or '(found on the host)'}"
        if self.slurm:
            options = " ".join(f"{k}={v}" for k, v in self.slurm_defaults().items())
            text += f"; Slurm jobs via srun{' ' + options if options else ''}"
        return text


def default_workdir(alias: str, local_dir: str, transport: str = "ssh") -> str:
    """The host-side work directory for a notebook folder, when none is configured.

    On an ssh host it is relative to the remote home; on this machine (any
    ``process`` host, e.g. a Slurm login node added with --process) it is
    absolute, under the cache directory, never inside the notebook folder.
    """
    local = Path(local_dir).resolve()
    digest = hashlib.sha256(str(local).encode()).hexdigest()[:8]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", local.name) or "root"
    if alias == PROCESS or transport == PROCESS:
        base = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser()
        return str(base / "link-kernel" / alias / f"{name}-{digest}")
    return f".cache/link-kernel/work/{name}-{digest}"


def registry_path() -> Path:
    from jupyter_core.paths import jupyter_config_dir

    return Path(jupyter_config_dir()) / "link" / "hosts.toml"


def load_registry(path: Path | None = None) -> dict[str, HostConfig]:
    path = path or registry_path()
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        msg = f"cannot read the host registry {path}: {exc}"
        raise HostConfigError(msg) from exc
    hosts: dict[str, HostConfig] = {}
    known = {f.name for f in fields(HostConfig)} - {"alias", "source"}
    for alias, values in (data.get("hosts") or {}).items():
        unknown = set(values) - known
        if unknown:
            msg = f"{path}: host {alias!r} has unknown settings {sorted(unknown)}; valid: {sorted(known)}"
            raise HostConfigError(msg)
        try:
            hosts[alias] = HostConfig(alias=alias, source=str(path), **values)
        except TypeError as exc:
            raise HostConfigError(f"{path}: host {alias!r}: {exc}") from exc
    return hosts


def save_registry(hosts: dict[str, HostConfig], path: Path | None = None) -> Path:
    path = path or registry_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "\n\n".join(h.to_toml() for h in sorted(hosts.values(), key=lambda h: h.alias))
    header = (
        "# Link (hybrid) hosts. Edit freely; 'link-kernel hosts add/remove' rewrite this file.\n"
        "# Settings: transport, hostname, port, user, identity, python, workdir, cache (the\n"
        "# host's variable cache), kernel, ssh_config, known_hosts, standby, standby_data\n"
        "# (GiB of the last cell's data a standby holds ready), idle_timeout, fork_server\n"
        "# (kernels forked from a process with ipykernel and the notebook's modules imported),\n"
        "# slurm (cells run as Slurm jobs) and its defaults partition, gpus, cpus, mem, time.\n\n"
    )
    tmp = path.with_suffix(".tmp")
    tmp.write_text(header + body + "\n")
    tmp.replace(path)
    return path


def ssh_config_aliases(path: Path | None = None) -> list[str]:
    """The concrete ``Host`` names of an ssh config (no patterns)."""
    path = path or Path("~/.ssh/config").expanduser()
    try:
        text = path.read_text()
    except OSError:
        return []
    names: list[str] = []
    for line in text.splitlines():
        words = line.strip().split()
        if len(words) >= 2 and words[0].lower() == "host":
            names += [w for w in words[1:] if not any(c in w for c in "*?!") and _ALIAS.fullmatch(w)]
    return names


def stamp() -> tuple:
    """What changes when :func:`load` would answer differently (the files it reads)."""
    marks = []
    for path in (registry_path(), Path("~/.ssh/config").expanduser()):
        try:
            st = path.stat()
            marks.append((str(path), st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            marks.append((str(path), None))
    return tuple(marks)


def load(registry: Path | None = None, ssh_config: Path | None = None) -> dict[str, HostConfig]:
    """Every known host: built-in ``process``, ssh config hosts, then the registry."""
    hosts = {PROCESS: HostConfig(alias=PROCESS, transport="process", source="built-in")}
    for alias in ssh_config_aliases(ssh_config):
        if alias != "local":
            hosts[alias] = HostConfig(alias=alias, transport="ssh", source="ssh config")
    hosts.update(load_registry(registry))
    return hosts


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_value(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def as_dict(host: HostConfig) -> dict[str, Any]:
    return asdict(host)
