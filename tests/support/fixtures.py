"""pytest fixtures for a real OpenSSH server (loaded by tests/conftest.py as a plugin).

- ``sshd``: one SSHServer for the whole session; a test may ``restart()`` it
  (same port, same keys) but must not leave it stopped.
- ``sshd_password_only``: a module's SSHServer that offers only password and
  keyboard-interactive logins.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .sshd import SSHServer


@pytest.fixture(scope="session")
def sshd() -> Iterator[SSHServer]:
    with SSHServer() as server:
        yield server


@pytest.fixture(scope="module")
def sshd_password_only() -> Iterator[SSHServer]:
    with SSHServer(alias="linktest-password", password_only=True) as server:
        yield server
