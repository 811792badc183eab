"""A trivial remote cell over loopback SSH, against a persistent ipykernel on the same link.

    python benchmarks/remote_cell.py [-n 20]

One run, one sshd on 127.0.0.1 (started here), one SSH connection per side:

- **baseline**: a plain ipykernel started on the host through an SSH
  connection (pty session, ports tunnelled), measured for its cold start
  (spawn until kernel_info answers, the median of five kernels) and its
  ``1+1`` round trip (reply + idle), timed as Link's cells are: the same
  client, the same pause between cells (back to back it is printed too);
- **Link, warm standby**: ``# link: bench\\n1+1`` through the Link kernel, with
  the next cell's kernel already booted (goal: at most 3x the round trip);
- **Link, no standby**: the same cell on a host with standby off, against the
  host's cold start plus one round trip (goal: at most 1.2x);
- **20 small variables**: the same warm cell reading 20 small variables,
  against it reading none (goal: under 20 ms more);
- **back to back**: the warm cell sent as Run All sends cells, each the moment
  the last one is idle, against a plain ipykernel on this machine timed the
  same way (goal: at most 15x).

Both sides are timed by one jupyter_client blocking client without schema
validation (``harness.lean_cell``). Each Link cell's reply carries its time
breakdown (connect, start, ready, run, release, ...), printed as medians.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import statistics
import sys
import time
from collections import defaultdict

from harness import isolated_jupyter, lean_cell, link_client, median_ms, register, ssh_host, sshd


async def plain_kernel(server, base, rounds: int, settle: float, starts: int) -> tuple[float, float, float]:
    """A plain ipykernel over SSH: (cold start, paced round trip, back-to-back round trip).

    The cold start runs from spawn until kernel_info answers: the median of
    ``starts`` kernels started one after another. The round trips, on the last
    of them, are ``1+1`` (reply and idle) through a jupyter_client client,
    timed like the Link cells: ``rounds`` of them ``settle`` seconds apart,
    then 100 back to back.
    """
    from jupyter_client.blocking.client import BlockingKernelClient

    from link_kernel.transports.ssh import SSHTransport

    host = ssh_host("baseline", server, base)
    transport = SSHTransport(host, str(base / "baseline-work"))
    await transport.connect()
    await transport.prepare()
    conn_file = transport.path(".link", "plain.json")
    sftp = transport.connection.sftp()

    async def start() -> tuple[BlockingKernelClient, object, float]:
        info = {"ip": "127.0.0.1", "transport": "tcp", "key": secrets.token_hex(32),
                "signature_scheme": "hmac-sha256", "shell_port": 0, "iopub_port": 0,
                "stdin_port": 0, "control_port": 0, "hb_port": 0}
        await transport.put(conn_file, json.dumps(info).encode())
        started = time.perf_counter()
        command = await asyncio.to_thread(
            transport.connection.spawn,
            ["exec", sys.executable, "-m", "ipykernel_launcher", "-f", conn_file],
            pty=True,
        )
        while True:
            try:  # the kernel rewrites the file with its ports: it may be missing a moment
                written = json.loads(await asyncio.to_thread(transport.connection.get_file, conn_file))
            except (FileNotFoundError, ValueError):
                written = {}
            if all(written.get(k) for k in info if k.endswith("_port")):
                break
            await asyncio.sleep(0.005)
        local = {k: (await transport.reach(written[k]))[1] for k in info if k.endswith("_port")}
        kc = BlockingKernelClient()
        kc.load_connection_info({**info, **local})
        kc.start_channels()
        await asyncio.to_thread(kc.wait_for_ready, 60)
        return kc, command, time.perf_counter() - started

    async def stop(kc, command) -> None:
        kc.shutdown()
        await asyncio.to_thread(command.wait, 10)
        kc.stop_channels()
        command.close()

    colds = []
    for _ in range(starts):
        kc, command, cold = await start()
        colds.append(cold)
        if len(colds) < starts:
            await stop(kc, command)

    def round_trips() -> tuple[list[float], list[float]]:
        for _ in range(10):
            lean_cell(kc, "1+1")
        paced = []
        for _ in range(rounds):
            time.sleep(settle)
            paced.append(lean_cell(kc, "1+1")[0])
        return paced, [lean_cell(kc, "1+1")[0] for _ in range(100)]

    try:
        paced, back_to_back = await asyncio.to_thread(round_trips)
    finally:
        await stop(kc, command)
    with contextlib.suppress(FileNotFoundError):  # the kernel may have removed it
        sftp.remove(conn_file)
    await transport.close()
    return statistics.median(colds), statistics.median(paced), statistics.median(back_to_back)


def plain_local(n: int) -> float:
    """The median ``1+1`` round trip of a plain ipykernel on this machine, back to back."""
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3")
    try:
        for _ in range(10):
            lean_cell(kc, "1+1")
        return statistics.median(lean_cell(kc, "1+1")[0] for _ in range(n))
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)


def link_cells(client, code: str, n: int, settle: float) -> tuple[list[float], dict[str, list[float]]]:
    times: list[float] = []
    phases: dict[str, list[float]] = defaultdict(list)
    for _ in range(n):
        time.sleep(settle)
        seconds, reply = lean_cell(client.kc, code)
        times.append(seconds)
        for phase, value in reply["metadata"]["link"].get("timings", {}).items():
            phases[phase].append(value)
    return times, phases


def show_phases(phases: dict[str, list[float]]) -> str:
    return ", ".join(f"{k} {median_ms(v):.1f}" for k, v in phases.items() if k != "standby")


#: Plain kernels started for the baseline's cold start (their median).
COLD_STARTS = 5
#: Seconds between measured cells, on both sides: a warm standby boots in this pause.
SETTLE = 1.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20, help="cells per measurement")
    args = parser.parse_args()

    with isolated_jupyter() as base, sshd() as server:
        cold_start, rtt, rtt_b2b = asyncio.run(plain_kernel(server, base, args.n, SETTLE, COLD_STARTS))
        register(
            ssh_host("bench", server, base, standby=True),
            ssh_host("bench-cold", server, base, standby=False),
        )
        client = link_client(base / "notebook")
        try:
            client.run("\n".join(f"v{i} = {i}" for i in range(20)))
            lean_cell(client.kc, "# link: bench\n1+1")  # connect, first kernel
            warm, warm_phases = link_cells(client, "# link: bench\n1+1", args.n, SETTLE)
            reads = "# link: bench\n" + " + ".join(f"v{i}" for i in range(20))
            with_vars, var_phases = link_cells(client, reads, args.n, SETTLE)
            local_b2b = plain_local(100)
            b2b, b2b_phases = link_cells(client, "# link: bench\n1+1", args.n, 0)
            lean_cell(client.kc, "# link: bench-cold\n1+1")
            cold, cold_phases = link_cells(client, "# link: bench-cold\n1+1", max(5, args.n // 2), 0)
        finally:
            client.shutdown()

    print(f"plain ipykernel over the same SSH link: cold start {cold_start * 1000:.0f} ms "
          f"(median of {COLD_STARTS}), "
          f"1+1 round trip {rtt * 1000:.2f} ms ({args.n} cells {SETTLE} s apart, like Link's), "
          f"{rtt_b2b * 1000:.2f} ms back to back")
    print(f"Link, warm standby:  {median_ms(warm):7.1f} ms  [{show_phases(warm_phases)}]")
    print(f"Link, no standby:    {median_ms(cold):7.1f} ms  [{show_phases(cold_phases)}]")
    print(f"Link, 20 variables:  {median_ms(with_vars):7.1f} ms  [{show_phases(var_phases)}]")
    print(f"Link, back to back:  {median_ms(b2b):7.1f} ms  [{show_phases(b2b_phases)}]; "
          f"plain local ipykernel back to back {local_b2b * 1000:.2f} ms")
    print()
    warm_ratio = statistics.median(warm) / rtt
    cold_ratio = statistics.median(cold) / (cold_start + rtt)
    extra = median_ms(with_vars) - median_ms(warm)
    print(f"warm cell / persistent round trip:       {warm_ratio:5.2f}x  (goal <= 3; "
          f"{statistics.median(warm) / rtt_b2b:.2f}x against back to back)")
    print(f"cold cell / (cold start + round trip):   {cold_ratio:5.2f}x  (goal <= 1.2)")
    print(f"20 small variables cost:                 {extra:+6.1f} ms (goal < 20 ms)")
    print(f"back to back / plain local round trip:   {statistics.median(b2b) / local_b2b:5.2f}x  (goal <= 15)")


if __name__ == "__main__":
    main()
