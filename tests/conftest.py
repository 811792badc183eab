"""Test session setup: isolated Jupyter and IPython dirs, the Link kernelspec, clients.

Every test session gets its own Jupyter config/data/runtime dirs and its own
IPYTHONDIR (a shared history database breaks history tests), and the Link
kernelspec installed under a private prefix that only this session's
JUPYTER_PATH names. This runs at import, before jupyter_client reads a path.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(tempfile.mkdtemp(prefix="link-tests-"))
for _var, _sub in (
    ("JUPYTER_CONFIG_DIR", "config"),
    ("JUPYTER_DATA_DIR", "data"),
    ("JUPYTER_RUNTIME_DIR", "runtime"),
    ("IPYTHONDIR", "ipython"),
    ("XDG_CACHE_HOME", "cache"),
):
    os.environ[_var] = str(ROOT / _sub)
os.environ["JUPYTER_PATH"] = str(ROOT / "share" / "jupyter")
os.environ["JUPYTER_PLATFORM_DIRS"] = "1"
os.environ.pop("JUPYTER_PREFER_ENV_PATH", None)

from link_kernel import kernelspec  # noqa: E402

kernelspec.install(prefix=str(ROOT))

sys.path.insert(0, str(Path(__file__).parent))

from kernel_client import LinkClient, start_client  # noqa: E402

pytest_plugins = ["remote_hosts"] + (["support.fixtures"] if (Path(__file__).parent / "support" / "fixtures.py").exists() else [])


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(ROOT, ignore_errors=True)


@pytest.fixture(scope="session")
def session_root() -> Path:
    return ROOT


@pytest.fixture(scope="module")
def link() -> LinkClient:
    """A Link kernel shared by a module's tests."""
    client = start_client("link")
    yield client
    client.shutdown()


@pytest.fixture
def fresh_link() -> LinkClient:
    """A Link kernel of the test's own."""
    client = start_client("link")
    yield client
    client.shutdown()
