"""Run a notebook headless through the Link kernel and show what each cell printed.

    python examples/run_notebook.py examples/quickstart.ipynb [--kernel link]

The executed notebook is written next to the input as NAME.out.ipynb.
Exits with status 1 if a cell fails (cells tagged ``raises-exception`` may).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def show(cell: dict) -> None:
    source = cell.source.rstrip()
    print(f"\n\x1b[1mIn [{cell.get('execution_count') or ' '}]:\x1b[0m")
    for line in source.splitlines():
        print(f"    {line}")
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            text = out.text
        elif out.output_type in ("execute_result", "display_data"):
            text = out.data.get("text/plain", "")
        elif out.output_type == "error":
            text = ANSI.sub("", "\n".join(out.traceback))
        else:
            continue
        for line in text.rstrip("\n").splitlines():
            print(f"  | {line}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--kernel", default="link")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    args = parser.parse_args()

    nb = nbformat.read(args.notebook, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name=args.kernel,
        timeout=args.timeout,
        resources={"metadata": {"path": str(args.notebook.parent.resolve())}},
    )
    start = time.monotonic()
    failed = None
    try:
        client.execute()
    except CellExecutionError as exc:
        failed = exc
    for cell in nb.cells:
        if cell.cell_type == "code":
            show(cell)
    out = args.notebook.with_suffix(".out.ipynb")
    nbformat.write(nb, out)
    print(f"\nRan {args.notebook} through kernel {args.kernel!r} in "
          f"{time.monotonic() - start:.1f} s; executed notebook: {out}")
    if failed is not None:
        print(f"A cell failed:\n{ANSI.sub('', str(failed))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
