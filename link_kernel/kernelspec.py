"""The "Link (hybrid)" kernelspec: write it, install it."""

from __future__ import annotations

import json
import sys
import tempfile
from importlib import resources
from pathlib import Path

from jupyter_client.kernelspec import KernelSpecManager

KERNEL_NAME = "link"
DISPLAY_NAME = "Link (hybrid)"
LOGOS = ("logo-32x32.png", "logo-64x64.png", "logo-svg.svg")


def spec_dict(display_name: str = DISPLAY_NAME, python: str | None = None) -> dict:
    """The kernel.json of the Link kernel run by ``python`` (default: this one)."""
    return {
        "argv": [python or sys.executable, "-m", "link_kernel", "-f", "{connection_file}"],
        "display_name": display_name,
        "language": "python",
        "interrupt_mode": "message",
        "metadata": {"debugger": False},
    }


def write_kernel_spec(path: Path, display_name: str = DISPLAY_NAME) -> Path:
    """Write kernel.json and the logos into ``path``; return it."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "kernel.json").write_text(json.dumps(spec_dict(display_name), indent=1) + "\n")
    source = resources.files("link_kernel") / "resources"
    for logo in LOGOS:
        item = source / logo
        if item.is_file():
            (path / logo).write_bytes(item.read_bytes())
    return path


def install(
    *,
    user: bool = False,
    prefix: str | None = None,
    name: str = KERNEL_NAME,
    display_name: str = DISPLAY_NAME,
) -> str:
    """Install the kernelspec where Jupyter finds it; return the directory.

    With neither ``user`` nor ``prefix``, it goes to the system-wide location,
    as ``jupyter kernelspec install`` does.
    """
    with tempfile.TemporaryDirectory() as tmp:
        source = write_kernel_spec(Path(tmp) / name, display_name)
        return KernelSpecManager().install_kernel_spec(
            str(source), name, user=user, prefix=prefix
        )


def uninstall(name: str = KERNEL_NAME) -> None:
    KernelSpecManager().remove_kernel_spec(name)

