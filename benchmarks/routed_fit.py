"""A routed ``LinearRegression().fit`` cell in a data-science notebook, against the same cell local.

    python benchmarks/routed_fit.py [-n 10] [--transport process|ssh|both]

One run, one Link kernel per transport. The notebook imports numpy, pandas,
scikit-learn and matplotlib and makes ``X`` (1000 x 10) and ``y``; then the
cell ``LinearRegression().fit(X, y)`` runs

- locally (the Link kernel's local ipykernel), and
- routed to a host (``# link: bench``), with its warm standby,

each ``-n`` times with cells about a second apart, then ``-n`` times back to
back (as Run All sends them). Printed side by side: the medians, and the
routed cell's extra time over the local one (goal: at most 150 ms). The
first routed cell (connect, first kernel, nothing imported yet) is printed
too. Both sides are timed the same way (``harness.lean_cell``: request until
reply and idle). Each routed cell's phases (from its reply's metadata) are
printed as medians.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

from harness import isolated_jupyter, lean_cell, link_client, median_ms, register, ssh_host, sshd

SETUP = """\
import numpy as np
import pandas as pd
import matplotlib.pyplot as plt
from sklearn.linear_model import LinearRegression
rng = np.random.default_rng(0)
X = rng.normal(size=(1000, 10))
y = X @ rng.normal(size=10) + rng.normal(scale=0.1, size=1000)
"""
CELL = "LinearRegression().fit(X, y)"
PAUSE = 1.0


def cells(client, code: str, n: int, pause: float) -> tuple[list[float], dict[str, list[float]]]:
    times: list[float] = []
    phases: dict[str, list[float]] = defaultdict(list)
    for _ in range(n):
        time.sleep(pause)
        seconds, reply = lean_cell(client.kc, code)
        times.append(seconds)
        for phase, value in reply["metadata"].get("link", {}).get("timings", {}).items():
            phases[phase].append(value)
    return times, phases


def show_phases(phases: dict[str, list[float]]) -> str:
    return ", ".join(f"{k} {median_ms(v):.0f}" for k, v in phases.items() if k != "standby")


def measure(client, alias: str, n: int) -> list[str]:
    lean_cell(client.kc, SETUP)
    lean_cell(client.kc, CELL)  # the local kernel's first fit (sklearn's lazy imports)
    routed = f"# link: {alias}\n{CELL}"
    first, _ = lean_cell(client.kc, routed)
    lines = [f"{alias}: first routed cell (connect, first kernel): {first * 1000:.0f} ms"]
    for label, pause in (("cells 1 s apart", PAUSE), ("back to back", 0.0)):
        local, _ = cells(client, CELL, n, pause)
        remote, phases = cells(client, routed, n, pause)
        extra = median_ms(remote) - median_ms(local)
        lines.append(
            f"{alias}, {label:15}: local {median_ms(local):6.1f} ms | routed {median_ms(remote):6.1f} ms"
            f" | extra {extra:+6.0f} ms (goal <= 150)  [{show_phases(phases)}]"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10, help="cells per measurement")
    parser.add_argument("--transport", choices=["process", "ssh", "both"], default="both")
    args = parser.parse_args()
    from link_kernel.hosts import HostConfig

    lines: list[str] = []
    with isolated_jupyter() as base:
        if args.transport in ("process", "both"):
            register(HostConfig(alias="bench", transport="process", workdir=str(base / "bench-work")))
            client = link_client(base / "notebook-process")
            try:
                lines += measure(client, "bench", args.n)
            finally:
                client.shutdown()
        if args.transport in ("ssh", "both"):
            with sshd() as server:
                register(ssh_host("bench-ssh", server, base, standby=True))
                client = link_client(base / "notebook-ssh")
                try:
                    lines += measure(client, "bench-ssh", args.n)
                finally:
                    client.shutdown()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
