"""Build the transport a host's settings ask for."""

from __future__ import annotations

import os

from ..hosts import HostConfig, default_workdir
from . import Transport


def make_transport(host: HostConfig, local_dir: str) -> Transport:
    """The transport of ``host``, for a notebook whose folder is ``local_dir``."""
    workdir = host.workdir or default_workdir(host.alias, local_dir, host.transport)
    if host.transport == "process":
        from .process import ProcessTransport

        transport = ProcessTransport(host.alias, workdir)
        transport.blob_dir = os.path.expanduser(host.cache) if host.cache else ""
        return transport
    from .ssh import SSHTransport

    return SSHTransport(host, workdir)
