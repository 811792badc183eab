"""A trivial cell on a Slurm host against a plain local kernel start plus one round trip.

    python benchmarks/slurm_cell.py [-n 20]

Starts its own one-node Slurm (tests/support/slurm.py; needs root, slurm-wlm
and munge) and its own Jupyter dirs, registers this machine as a Slurm login
node on the ``process`` transport, and in one run times:

- Link: ``# link: cluster\\n1+1`` through the installed kernelspec, from
  execute_request until the execute_reply and idle have arrived. Each cell is a
  fresh Slurm job (srun, kernel start, the cell, shutdown, scancel, the job
  gone from squeue); Slurm hosts keep no warm standby.
- plain: a jupyter_client KernelManager starting a local ipykernel,
  wait_for_ready, ``1+1``, shutdown; the same count, in turns with the above.

Prints both medians and the ratio Link / plain (goal: at most 1.3), and the same
ratio with the plain kernel's shutdown left out (a Link cell includes its release).
"""

from __future__ import annotations

import argparse
import statistics
import time

from harness import isolated_jupyter, link_client, median_ms, register, timed_cell


def plain_start_and_roundtrip() -> tuple[float, float]:
    """(start + 1+1 + shutdown, start + 1+1) in seconds."""
    from jupyter_client.manager import KernelManager

    start = time.perf_counter()
    km = KernelManager(kernel_name="python3")
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        reply = kc.execute_interactive("1+1", timeout=60, output_hook=lambda msg: None)
        if reply["content"]["status"] != "ok":
            raise RuntimeError(f"plain kernel: {reply['content']}")
        answered = time.perf_counter() - start
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    return time.perf_counter() - start, answered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20, help="cells of each kind")
    args = parser.parse_args()

    from support.slurm import SlurmCluster, available

    from link_kernel.hosts import HostConfig

    reason = available()
    if reason:
        raise SystemExit(f"slurm_cell.py needs a one-node Slurm: {reason}")
    with isolated_jupyter() as base, SlurmCluster() as cluster:
        import os

        os.environ.update(cluster.env())
        from jupyter_client.kernelspec import KernelSpecManager
        from ipykernel.kernelspec import install as install_ipykernel

        install_ipykernel(prefix=str(base))  # "python3" on this interpreter
        assert "python3" in KernelSpecManager().find_kernel_specs()
        register(HostConfig(alias="cluster", transport="process", workdir=str(base / "work"),
                            slurm=True, partition=cluster.partition))
        client = link_client(base / "notebook")
        link: list[float] = []
        plain: list[float] = []
        no_shutdown: list[float] = []
        phases: dict[str, list[float]] = {}
        try:
            timed_cell(client, "# link: cluster\n1+1")  # first srun, first kernel
            plain_start_and_roundtrip()
            for _ in range(args.n):
                seconds, result = timed_cell(client, "# link: cluster\n1+1")
                if result.result != "2":
                    raise RuntimeError(f"unexpected result: {result.text}")
                link.append(seconds)
                timings = result.reply["metadata"]["link"].get("timings", {})
                for key, value in timings.items():
                    phases.setdefault(key, []).append(value)
                total, answered = plain_start_and_roundtrip()
                plain.append(total)
                no_shutdown.append(answered)
            left = cluster.jobs()
        finally:
            client.shutdown()

    shown = ", ".join(f"{k} {median_ms(v):.1f}" for k, v in phases.items())
    print(f"plain local ipykernel, start + 1+1 + shutdown: {median_ms(plain):7.1f} ms "
          f"(median of {len(plain)})")
    print(f"  of which start + 1+1 (before shutdown):       {median_ms(no_shutdown):7.1f} ms")
    print(f"Link, trivial Slurm cell (one job each):       {median_ms(link):7.1f} ms "
          f"(median of {len(link)})  [{shown}]")
    print(f"jobs left in squeue after the cells: {len(left)}")
    ratio = statistics.median(link) / statistics.median(plain)
    print(f"Slurm cell / (kernel start + round trip):      {ratio:5.2f}x  (goal <= 1.3)")
    strict = statistics.median(link) / statistics.median(no_shutdown)
    print(f"  the same, the plain kernel's shutdown left out: {strict:5.2f}x")


if __name__ == "__main__":
    main()
