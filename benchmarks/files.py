"""File sync of a notebook folder, against ``rsync -a`` over the same sshd, in one run.

    python benchmarks/files.py

Link's cost is what a user waits for: the time of a trivial remote cell with
files synced, minus the same cell with ``files=off`` (both on a warm standby
kernel). rsync's is a full ``rsync -a`` to a directory on the same host,
through the same sshd, with the same cipher list. Three cases, each printed
with its ratio Link / rsync:

- (a) first sync of 1,000 files / 200 MB (goal: at most rsync's time), three rounds;
- (b) a sync with nothing to do, 10,000 files (goal: under 0.2 of rsync);
- (c) one changed 50 MB file in a 1 GB tree.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from pathlib import Path

from harness import isolated_jupyter, link_client, register, ssh_host, sshd, timed_cell


ROUNDS = 3


def make_tree(root: Path, files: int, total_bytes: int, big: int = 0) -> None:
    root.mkdir(parents=True, exist_ok=True)
    each = max(1, (total_bytes - big) // files)
    for i in range(files):
        d = root / f"d{i // 100:03d}"
        d.mkdir(exist_ok=True)
        (d / f"f{i:05d}.bin").write_bytes(os.urandom(each) if each > 64 else b"x" * each)
    if big:
        (root / "big.bin").write_bytes(os.urandom(big))


def rsync_seconds(server, src: Path, dest: str) -> float:
    ssh = (f"ssh -F {os.devnull} -i {server.client_key} -p {server.port} "
           f"-o UserKnownHostsFile={server.known_hosts} -o StrictHostKeyChecking=yes "
           "-o BatchMode=yes -c aes128-gcm@openssh.com")
    start = time.perf_counter()
    subprocess.run(["rsync", "-a", "-e", ssh, f"{src}/", f"{server.user}@{server.host}:{dest}/"],
                   check=True)
    return time.perf_counter() - start


def cell_overhead(client, alias: str, rounds: int = 5) -> float:
    """Median time of a trivial cell with files, minus files=off (warm standby each time)."""
    with_files, without = [], []
    for _ in range(rounds):
        time.sleep(1.5)
        with_files.append(timed_cell(client, f"# link: {alias}\n0")[0])
        time.sleep(1.5)
        without.append(timed_cell(client, f"# link: {alias} files=off\n0")[0])
    return statistics.median(with_files) - statistics.median(without)


def first_sync(client, alias: str) -> float:
    seconds, result = timed_cell(client, f"# link: {alias}\n0", timeout=1200)
    return result.reply["metadata"]["link"]["timings"]["files out"]


def main() -> None:
    with isolated_jupyter() as base, sshd() as server:
        rows = []
        # (a) first sync, 1,000 files / 200 MB: three rounds, each to a fresh host
        # directory, rsync and Link side by side (their order alternates)
        nb_a = base / "nb-a"
        make_tree(nb_a, 1000, 200 * 10**6)
        register(*(ssh_host(f"bench-a{r}", server, base) for r in range(ROUNDS)))
        client = link_client(nb_a)
        ratios = []
        try:
            for r in range(ROUNDS):
                timed_cell(client, f"# link: bench-a{r} files=off\n0")  # connect, first kernel
                time.sleep(1.5)
                if r % 2:
                    link_a = first_sync(client, f"bench-a{r}")
                    rsync_a = rsync_seconds(server, nb_a, str(base / f"rsync-a{r}"))
                else:
                    rsync_a = rsync_seconds(server, nb_a, str(base / f"rsync-a{r}"))
                    link_a = first_sync(client, f"bench-a{r}")
                ratios.append(link_a / rsync_a)
                rows.append((f"(a) first sync, 1,000 files / 200 MB, round {r + 1}", link_a, rsync_a, 1.0))
        finally:
            client.shutdown()
        print(f"(a) ratios over {ROUNDS} rounds: {min(ratios):.2f}-{max(ratios):.2f} "
              f"(median {statistics.median(ratios):.2f})")

        # (b) nothing to do, 10,000 files
        nb_b = base / "nb-b"
        make_tree(nb_b, 10_000, 10_000 * 100)
        rsync_seconds(server, nb_b, str(base / "rsync-b"))
        rsync_b = statistics.median(rsync_seconds(server, nb_b, str(base / "rsync-b")) for _ in range(5))
        register(ssh_host("bench-b", server, base))
        client = link_client(nb_b)
        try:
            timed_cell(client, "# link: bench-b\n0", timeout=1200)  # the first, full sync
            link_b = cell_overhead(client, "bench-b")
        finally:
            client.shutdown()
        rows.append(("(b) no-change sync, 10,000 files", link_b, rsync_b, 0.2))

        # (c) one changed 50 MB file in a 1 GB tree
        nb_c = base / "nb-c"
        make_tree(nb_c, 950, 10**9, big=50 * 10**6)
        rsync_seconds(server, nb_c, str(base / "rsync-c"))
        register(ssh_host("bench-c", server, base))
        client = link_client(nb_c)
        try:
            timed_cell(client, "# link: bench-c\n0", timeout=1200)
            (nb_c / "big.bin").write_bytes(os.urandom(50 * 10**6))
            rsync_c = rsync_seconds(server, nb_c, str(base / "rsync-c"))
            time.sleep(1.5)
            link_c = first_sync(client, "bench-c")
        finally:
            client.shutdown()
        rows.append(("(c) one changed 50 MB file in a 1 GB tree", link_c, rsync_c, None))

    for name, link, rsync, goal in rows:
        target = f"  (goal <= {goal})" if goal else ""
        print(f"{name:<44} Link {link * 1000:8.1f} ms   rsync -a {rsync * 1000:8.1f} ms   "
              f"ratio {link / rsync:5.2f}{target}")


if __name__ == "__main__":
    main()
