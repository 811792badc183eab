"""The "Link (hybrid)" kernelspec: write it, install it.

The source is the repository's ``kernelspecs/link/`` folder: kernel.json and the logos, as
files. A checkout reaches it through the ``link_kernel/kernelspecs`` link; a wheel ships the
folder inside the package. Installing copies the folder and names the installing python as
the kernel's ``argv[0]``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from .errors import KernelSpecSourceError

KERNEL_NAME = "link"
DISPLAY_NAME = "Link (hybrid)"
#: The kernelspec folder: kernel.json and the logos.
SOURCE = Path(__file__).parent / "kernelspecs" / KERNEL_NAME


def spec_dict(display_name: str = DISPLAY_NAME, python: str | None = None) -> dict:
    """The kernel.json of the Link kernel run by ``python`` (default: this one)."""
    try:
        spec = json.loads((SOURCE / "kernel.json").read_text())
    except (OSError, ValueError) as exc:
        msg = f"cannot read the Link kernelspec in {SOURCE}: {exc}"
        raise KernelSpecSourceError(msg) from exc
    spec["argv"] = [python or sys.executable, *spec["argv"][1:]]
    spec["display_name"] = display_name
    return spec


def write_kernel_spec(path: Path, display_name: str = DISPLAY_NAME) -> Path:
    """Write kernel.json and the logos into ``path``; return it."""
    spec = spec_dict(display_name)
    path.mkdir(parents=True, exist_ok=True)
    (path / "kernel.json").write_text(json.dumps(spec, indent=1) + "\n")
    for item in sorted(SOURCE.iterdir()):
        if item.is_file() and item.name != "kernel.json":
            (path / item.name).write_bytes(item.read_bytes())
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
    from jupyter_client.kernelspec import KernelSpecManager  # 90 ms: only when installing

    with tempfile.TemporaryDirectory() as tmp:
        source = write_kernel_spec(Path(tmp) / name, display_name)
        return KernelSpecManager().install_kernel_spec(
            str(source), name, user=user, prefix=prefix
        )


def uninstall(name: str = KERNEL_NAME) -> None:
    from jupyter_client.kernelspec import KernelSpecManager

    KernelSpecManager().remove_kernel_spec(name)

