"""Pipelines: a component's overhead, and a cached parent restored against running it.

    python benchmarks/pipeline.py [--mib 1024] [-n 40]

One run, one Link kernel, side by side:

- **overhead**: a trivial component (``# link: name=t`` over ``x = 1``) against the same
  cell without ``name=``, medians of ``n`` alternating cells: milliseconds and ratio;
- **restore**: a parent that binds a float64 array of ``--mib`` MiB, run hidden (the
  child's first run: the parent computes it, and its result is written to the cache), then
  restored from the cache (the child's second run, with the namespace emptied): the
  parent's own seconds each time, from the quiet lines, and their ratio (goal <= 5%).
"""

from __future__ import annotations

import argparse
import statistics
import time

import nbformat
from harness import isolated_jupyter, lean_cell, median_ms
from kernel_client import start_client


def restore(client, use: str, forget) -> float:
    """``forget`` the parent's result, run the child: the parent's seconds to come
    back from the cache (an error if it ran instead)."""
    forget()
    restored = client.run(use, timeout=900)
    if "from cache" not in restored.notes[0]["content"]["data"]["text/plain"]:
        raise RuntimeError(f"not restored: {restored.notes}")
    return parent_seconds(restored, "big")


def parent_seconds(result, name: str) -> float:
    for note in result.notes:
        step = note["content"]["metadata"]["link"].get("pipeline", {})
        if step.get("component") == name:
            return float(step["seconds"])
    raise RuntimeError(f"no line for {name}: {result.notes}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="the parent's output in MiB")
    parser.add_argument("-n", type=int, default=40, help="cells per side for the overhead")
    args = parser.parse_args()
    n = args.mib * 2**20 // 8
    big = (f"# link: name=big\nimport numpy as np\n"
           f"a = np.random.default_rng(0).random({n})\n")
    use = "# link: name=use after=big\nfirst = float(a[0])\n"
    with isolated_jupyter() as base:
        folder = base / "notebook"
        folder.mkdir()
        saved = folder / "pipeline.ipynb"  # the kernel learns the components from it after a restart
        nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in (big, use)]), saved)
        client = start_client("link", cwd=str(folder), env={"JPY_SESSION_NAME": str(saved)})
        try:
            plain_cell, component_cell = "x = 1", "# link: name=t\nx = 1"
            for _ in range(3):  # warm both paths
                lean_cell(client.kc, plain_cell)
                lean_cell(client.kc, component_cell)
            plain, component = [], []
            for _ in range(args.n):
                time.sleep(0.05)
                plain.append(lean_cell(client.kc, plain_cell)[0])
                time.sleep(0.05)
                component.append(lean_cell(client.kc, component_cell)[0])
            p, c = median_ms(plain), median_ms(component)
            print(f"overhead: plain cell {p:.2f} ms, trivial component {c:.2f} ms: "
                  f"{c / p:.2f}x, +{c - p:.2f} ms (medians of {args.n})")

            client.run(big, timeout=900)  # the kernel learns the parent (and caches it)
            client.run("%link cache clear", timeout=300)
            client.run("del a", timeout=300)
            ran = client.run(use, timeout=900)
            run_s = parent_seconds(ran, "big")
            restore_s = statistics.median(
                restore(client, use, lambda: client.run("del a", timeout=300)) for _ in range(3)
            )
            print(f"restore: {args.mib} MiB parent run hidden {run_s:.2f} s (compute and cache); "
                  f"restored in the same kernel {restore_s:.3f} s (median of 3): {restore_s / run_s:.1%}")
            def restart() -> None:  # the blob is read from the store
                client.km.restart_kernel(now=False)
                client.kc.wait_for_ready(timeout=120)
                client.drain_iopub()

            cold_s = statistics.median(restore(client, use, restart) for _ in range(3))
            print(f"restore after a kernel restart: {cold_s:.3f} s (median of 3): "
                  f"{cold_s / run_s:.1%} of running it (goal <= 5%)")
        finally:
            client.shutdown()


if __name__ == "__main__":
    main()
