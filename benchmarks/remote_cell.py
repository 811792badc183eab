"""A trivial remote cell over loopback SSH, against a persistent ipykernel on the same link.

    python benchmarks/remote_cell.py [-n 20]

One run, one sshd on 127.0.0.1 (started here), one SSH connection per side:

- **baseline**: a plain ipykernel started on the host through an SSH
  connection (pty session, ports tunnelled), measured for its cold start
  (spawn until kernel_info answers) and its ``1+1`` round trip (reply + idle);
- **Link, warm standby**: ``# link: bench\\n1+1`` through the Link kernel, with
  the next cell's kernel already booted (goal: at most 3x the round trip);
- **Link, no standby**: the same cell on a host with standby off, against the
  host's cold start plus one round trip (goal: at most 1.2x);
- **20 small variables**: the same warm cell reading 20 small variables,
  against it reading none (goal: under 20 ms more).

Each Link cell's reply carries its time breakdown (connect, start, ready,
run, release, ...), printed as medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import sys
import time
from collections import defaultdict

from harness import isolated_jupyter, link_client, median_ms, register, ssh_host, sshd, timed_cell


async def plain_kernel(server, base, rounds: int) -> tuple[float, float]:
    """(cold start seconds, median round trip seconds) of a plain ipykernel over SSH."""
    import zmq

    from link_kernel.connection import KernelConnection
    from link_kernel.transports.ssh import SSHTransport

    host = ssh_host("baseline", server, base)
    transport = SSHTransport(host, str(base / "baseline-work"))
    await transport.connect()
    await transport.prepare()
    key = secrets.token_hex(32)
    conn_file = transport.path(".link", "plain.json")
    info = {"ip": "127.0.0.1", "transport": "tcp", "key": key, "signature_scheme": "hmac-sha256",
            "shell_port": 0, "iopub_port": 0, "stdin_port": 0, "control_port": 0, "hb_port": 0}
    await transport.put(conn_file, json.dumps(info).encode())
    context = zmq.Context()
    start = time.perf_counter()
    command = await asyncio.to_thread(
        transport.connection.spawn,
        ["exec", sys.executable, "-m", "ipykernel_launcher", "-f", conn_file],
        pty=True,
    )
    sftp = transport.connection.sftp()
    while True:
        written = json.loads(await asyncio.to_thread(transport.connection.get_file, conn_file))
        if all(written[k] for k in info if k.endswith("_port")):
            break
        await asyncio.sleep(0.005)
    local = {k: (await transport.reach(written[k]))[1] for k in info if k.endswith("_port")}
    conn = KernelConnection({**info, **local}, context=context, name="baseline")
    conn.on_iopub = lambda *a: None
    conn.open()
    await conn.wait_ready(60)
    cold = time.perf_counter() - start
    content = {"code": "1+1", "silent": False, "store_history": True, "user_expressions": {},
               "allow_stdin": False, "stop_on_error": True}
    times = []
    for _ in range(rounds + 10):
        t0 = time.perf_counter()
        await conn.send("execute_request", content, internal=False).done()
        times.append(time.perf_counter() - t0)
    await conn.request("shutdown_request", {"restart": False}, channel="control", timeout=10)
    await asyncio.to_thread(command.wait, 10)
    command.close()
    conn.close()
    sftp.remove(conn_file)
    await transport.close()
    context.term()
    return cold, statistics.median(times[10:])


def link_cells(client, code: str, n: int, settle: float) -> tuple[list[float], dict[str, list[float]]]:
    times: list[float] = []
    phases: dict[str, list[float]] = defaultdict(list)
    for _ in range(n):
        time.sleep(settle)
        seconds, result = timed_cell(client, code)
        times.append(seconds)
        for phase, value in result.reply["metadata"]["link"].get("timings", {}).items():
            phases[phase].append(value)
    return times, phases


def show_phases(phases: dict[str, list[float]]) -> str:
    return ", ".join(f"{k} {median_ms(v):.1f}" for k, v in phases.items() if k != "standby")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20, help="cells per measurement")
    args = parser.parse_args()

    with isolated_jupyter() as base, sshd() as server:
        cold_start, rtt = asyncio.run(plain_kernel(server, base, rounds=100))
        register(
            ssh_host("bench", server, base, standby=True),
            ssh_host("bench-cold", server, base, standby=False),
        )
        client = link_client(base / "notebook")
        try:
            client.run("\n".join(f"v{i} = {i}" for i in range(20)))
            timed_cell(client, "# link: bench\n1+1")  # connect, first kernel
            warm, warm_phases = link_cells(client, "# link: bench\n1+1", args.n, settle=1.5)
            reads = "# link: bench\n" + " + ".join(f"v{i}" for i in range(20))
            with_vars, var_phases = link_cells(client, reads, args.n, settle=1.5)
            timed_cell(client, "# link: bench-cold\n1+1")
            cold, cold_phases = link_cells(client, "# link: bench-cold\n1+1", max(5, args.n // 2), 0)
        finally:
            client.shutdown()

    print(f"plain ipykernel over the same SSH link: cold start {cold_start * 1000:.0f} ms, "
          f"1+1 round trip {rtt * 1000:.2f} ms (median of 100)")
    print(f"Link, warm standby:  {median_ms(warm):7.1f} ms  [{show_phases(warm_phases)}]")
    print(f"Link, no standby:    {median_ms(cold):7.1f} ms  [{show_phases(cold_phases)}]")
    print(f"Link, 20 variables:  {median_ms(with_vars):7.1f} ms  [{show_phases(var_phases)}]")
    print()
    warm_ratio = statistics.median(warm) / rtt
    cold_ratio = statistics.median(cold) / (cold_start + rtt)
    extra = median_ms(with_vars) - median_ms(warm)
    print(f"warm cell / persistent round trip:       {warm_ratio:5.2f}x  (goal <= 3)")
    print(f"cold cell / (cold start + round trip):   {cold_ratio:5.2f}x  (goal <= 1.2)")
    print(f"20 small variables cost:                 {extra:+6.1f} ms (goal < 20 ms)")


if __name__ == "__main__":
    main()
