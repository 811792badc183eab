"""A 1 GiB array into a ``process`` cell and back, against ipyparallel, in one run.

    pip install -e '.[bench]'        # ipyparallel, for this script only
    python benchmarks/ipyparallel_cell.py [--mib 1024] [--rounds 3]

Both start from a float64 array in a python process's memory and end with the
doubled array back in it; each round makes a new array (nothing is cached):

- **Link**: the notebook's kernel holds ``a``; ``# link: bench-proc\\na *= 2`` runs
  in a fresh kernel on this machine (the ``process`` host), and ``a`` comes back.
  Timed from execute_request to idle, as a user waits for it.
- **ipyparallel**: one engine, started once and kept (as ipyparallel is used);
  ``view.push({'a': a})``, ``view.execute('a *= 2')``, ``view.pull('a')``, each
  blocking, from this process.

The rounds alternate which goes first. Prints each round and the range of the
ratio ipyparallel / Link (goal: at least 3, Link three times faster).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from harness import isolated_jupyter, lean_cell, link_client


def ipyparallel_round(view, n: int, seed: int) -> float:
    a = np.random.default_rng(seed).random(n)
    start = time.perf_counter()
    view.push({"a": a}, block=True)
    view.execute("a *= 2", block=True)
    back = view.pull("a", block=True)
    seconds = time.perf_counter() - start
    if not np.array_equal(back, a * 2):
        raise RuntimeError("ipyparallel brought back something else")
    view.execute("del a", block=True)
    return seconds


def link_round(client, n: int, seed: int) -> tuple[float, dict]:
    client.run(f"a = np.random.default_rng({seed}).random({n})")
    time.sleep(2)  # the standby is up, as between two cells a user runs
    seconds, reply = lean_cell(client.kc, "# link: bench-proc\na *= 2")
    if reply["content"]["status"] != "ok":
        raise RuntimeError(f"the Link cell failed: {reply['content']}")
    check = client.run(f"bool((a == np.random.default_rng({seed}).random({n}) * 2).all())")
    if check.result != "True":
        raise RuntimeError(f"Link brought back something else: {check.text}")
    return seconds, reply["metadata"]["link"]["timings"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="array size in MiB")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import ipyparallel as ipp

    from link_kernel import hosts

    n = args.mib * 2**20 // 8
    with isolated_jupyter() as base:
        known = hosts.load_registry()
        known["bench-proc"] = hosts.HostConfig(alias="bench-proc", transport="process",
                                               workdir=str(base / "proc-work"))
        hosts.save_registry(known)
        cluster = ipp.Cluster(n=1, log_level=40)
        rc = cluster.start_and_connect_sync()
        client = link_client(base / "notebook")
        rows = []
        try:
            rc.wait_for_engines(1, timeout=60)
            view = rc[0]
            view.execute("import numpy", block=True)
            client.run("import numpy as np")
            lean_cell(client.kc, "# link: bench-proc\n1")  # the first kernel, as a warm-up
            for r in range(args.rounds):
                if r % 2:
                    link, timings = link_round(client, n, 2 * r)
                    ipp_s = ipyparallel_round(view, n, 2 * r + 1)
                else:
                    ipp_s = ipyparallel_round(view, n, 2 * r + 1)
                    link, timings = link_round(client, n, 2 * r)
                rows.append((link, ipp_s))
                steps = ", ".join(f"{k} {v:.2f}" for k, v in timings.items())
                print(f"round {r + 1}: Link {link:.2f} s ({steps})   ipyparallel {ipp_s:.2f} s   "
                      f"ratio ipyparallel / Link {ipp_s / link:.2f}  (goal >= 3)", flush=True)
        finally:
            client.shutdown()
            rc.close()
            cluster.stop_cluster_sync()
    ratios = [i / link for link, i in rows]
    print(f"{args.mib} MiB into a process cell and back: ratio ipyparallel / Link "
          f"{min(ratios):.2f}-{max(ratios):.2f} over {len(rows)} rounds "
          f"(median {statistics.median(ratios):.2f}; Link {min(r[0] for r in rows):.2f}-"
          f"{max(r[0] for r in rows):.2f} s, ipyparallel {min(r[1] for r in rows):.2f}-"
          f"{max(r[1] for r in rows):.2f} s)")


if __name__ == "__main__":
    main()
