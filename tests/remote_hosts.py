"""Hosts for remote-cell tests: a ``process`` host and an ``ssh`` host on a real sshd."""

from __future__ import annotations

import os
import sys

import pytest
from kernel_client import start_client

from link_kernel import hosts
from link_kernel.hosts import HostConfig


def register(*configs: HostConfig) -> None:
    known = hosts.load_registry()
    known.update({c.alias: c for c in configs})
    hosts.save_registry(known)


@pytest.fixture(scope="module", params=["process", "ssh"])
def remote(request, tmp_path_factory) -> str:
    """Register a host of each transport; return its alias."""
    workdir = tmp_path_factory.mktemp(f"work-{request.param}")
    if request.param == "process":
        register(HostConfig(alias="proc", transport="process", workdir=str(workdir)))
        return "proc"
    server = request.getfixturevalue("sshd")
    register(
        HostConfig(
            alias="gpu",
            transport="ssh",
            hostname=server.host,
            port=server.port,
            user=server.user,
            identity=str(server.client_key),
            known_hosts=str(server.known_hosts),
            ssh_config=os.devnull,
            python=sys.executable,
            workdir=str(workdir),
            cache=str(workdir.parent / f"{workdir.name}-cache"),
        )
    )
    return "gpu"


@pytest.fixture(scope="module")
def link_remote(remote, tmp_path_factory):
    client = start_client("link", cwd=str(tmp_path_factory.mktemp("notebook")))
    yield client
    client.shutdown()
