"""Soak: 300 cells alternating local, process and ssh, with variables and files.

    python benchmarks/soak.py [-n 300]

After a warm-up round, it releases every host's kernels and takes the
router's processes, file descriptors, threads and RSS as the baseline; after
the run it releases them again and prints what grew. Goals: 0 leaked
processes, file descriptors and threads (on the router and on the host), and
under 20 MB of RSS growth.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from harness import isolated_jupyter, link_client, register, ssh_host, sshd
from kernel_client import descendants


def router_state(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
    return {
        "processes": len(descendants(pid)),
        "fds": len(list(Path(f"/proc/{pid}/fd").iterdir())),
        "threads": len(list(Path(f"/proc/{pid}/task").iterdir())),
        "rss_kib": rss,
    }


def host_kernels(base: Path) -> int:
    """This run's Link supervisors and kernels alive on this machine (the hosts are
    local): those whose command line names a path under ``base``, the run's own
    directory, so a test suite or another run beside it is not counted."""
    mine = str(base).encode()
    count = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            link = b"become_subreaper" in cmdline or b"__link_agent__" in cmdline
            if state != "Z" and link and mine in cmdline:
                count += 1
    return count


def cell(i: int) -> str:
    target = ("local", "process", "bench")[i % 3]
    head = "" if target == "local" else f"# link: {target}\n"
    return (
        f"{head}import numpy as np\n"
        f"state['n'] += 1\n"
        f"arr = arr + 1\n"
        f"with open('soak-{i % 10}.txt', 'w') as f:\n"
        f"    f.write(str(state['n']))\n"
        f"state['n']"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=300, help="cells")
    args = parser.parse_args()
    with isolated_jupyter() as base, sshd() as server:
        register(ssh_host("bench", server, base))
        client = link_client(base / "notebook")
        try:
            client.run("import numpy as np\nstate = {'n': 0}\narr = np.zeros(10_000)")
            for i in range(30):  # long enough for asyncio's worker pool to reach its size
                client.run(cell(i))
            client.run("%link release")
            time.sleep(1)
            before = router_state(client.pid)

            host_before = host_kernels(base)
            started = time.monotonic()
            samples = []
            for i in range(args.n):
                result = client.run(cell(i), timeout=300)
                if result.status != "ok":
                    raise SystemExit(f"cell {i} failed: {result.text}")
                if (i + 1) % 100 == 0:
                    samples.append(router_state(client.pid))
            elapsed = time.monotonic() - started
            count = int(client.run("state['n']").result)
            client.run("%link release")
            time.sleep(1)
            after = router_state(client.pid)

            host_after = host_kernels(base)
        finally:
            client.shutdown()
    print(f"{args.n} cells (local, process, ssh in turn) in {elapsed:.1f} s; "
          f"state['n'] = {count} (expected {30 + args.n})")
    for key in ("processes", "fds", "threads"):
        print(f"router {key:<10} {before[key]:5d} -> {after[key]:5d}   leaked {after[key] - before[key]:+d}")
    print("every 100 cells: " + "; ".join(
        f"{s['processes']} processes, {s['fds']} fds, {s['threads']} threads, "
        f"{s['rss_kib'] / 1024:.1f} MiB" for s in samples))
    print(f"host kernels      {host_before:5d} -> {host_after:5d}   leaked {host_after - host_before:+d}")
    growth = (after["rss_kib"] - before["rss_kib"]) / 1024
    print(f"router RSS        {before['rss_kib'] / 1024:5.1f} -> {after['rss_kib'] / 1024:5.1f} MiB"
          f"   growth {growth:+.1f} MiB (goal < 20)")


if __name__ == "__main__":
    main()
