"""A 1 GiB array to a remote cell and back, against scp of the same bytes on the same sshd.

    python benchmarks/variables.py [--mib 1024]

One run, one sshd on 127.0.0.1 (started here):

- **scp**: the array's bytes as a file, host-bound and back, with scp
  (aes128-gcm, as OpenSSH negotiates on this link): seconds and MiB/s;
- **Link**: ``a`` (float64, 1 GiB) built locally, then
  ``# link: bench\\na *= 2`` so it travels out, is changed in place, and comes
  back: seconds, MiB/s (2 GiB moved) and the ratio to scp's (goal >= 0.6);
- **again**: the same cell on the unchanged input, as a fraction of the
  first run (goal < 5%: the host has the input already, and the result it
  computes is already here);
- **20 small variables**: a warm cell reading 20 ints, against one reading none.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time

from harness import isolated_jupyter, lean_cell, link_client, median_ms, register, ssh_host, sshd


def scp_seconds(server, base, path, size_mib: int) -> tuple[float, float]:
    ssh_opts = ["-F", os.devnull, "-i", str(server.client_key), "-o", f"UserKnownHostsFile={server.known_hosts}",
                "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-P", str(server.port),
                "-c", "aes128-gcm@openssh.com"]
    remote = f"{server.user}@{server.host}:{base}/scp-remote.bin"
    back = base / "scp-back.bin"
    t0 = time.perf_counter()
    subprocess.run(["scp", "-q", *ssh_opts, str(path), remote], check=True)
    t1 = time.perf_counter()
    subprocess.run(["scp", "-q", *ssh_opts, remote, str(back)], check=True)
    t2 = time.perf_counter()
    back.unlink()
    return t1 - t0, t2 - t1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="array size in MiB")
    args = parser.parse_args()
    n = args.mib * 2**20 // 8
    with isolated_jupyter() as base, sshd() as server:
        payload = base / "payload.bin"
        with payload.open("wb") as f:
            f.write(os.urandom(args.mib * 2**20))
        up, down = scp_seconds(server, base, payload, args.mib)
        payload.unlink()
        register(ssh_host("bench", server, base))
        client = link_client(base / "notebook")
        try:
            client.run(f"import numpy as np\na = np.random.default_rng(0).random({n})\n" +
                       "\n".join(f"v{i} = {i}" for i in range(20)))
            lean_cell(client.kc, "# link: bench\n1")
            time.sleep(2)
            first, reply = lean_cell(client.kc, "# link: bench\na *= 2")
            moved = reply["metadata"]["link"]
            check = client.run(f"bool(a[:3].tolist() == (np.random.default_rng(0).random(3) * 2).tolist())")
            assert check.result == "True", check.text
            client.run(f"a = np.random.default_rng(0).random({n})")  # the same input again
            time.sleep(2)
            again, again_reply = lean_cell(client.kc, "# link: bench\na *= 2")
            warm = []
            with_vars = []
            reads = "# link: bench\n" + " + ".join(f"v{i}" for i in range(20))
            for _ in range(10):
                time.sleep(1.5)
                warm.append(lean_cell(client.kc, "# link: bench\n0")[0])
                time.sleep(1.5)
                with_vars.append(lean_cell(client.kc, reads)[0])
        finally:
            client.shutdown()
    mib = args.mib
    scp_rate = 2 * mib / (up + down)
    link_rate = 2 * mib / first
    print(f"scp:  {mib} MiB out in {up:.2f} s, back in {down:.2f} s: {scp_rate:.0f} MiB/s")
    print(f"Link: {mib} MiB array out, changed, back in {first:.2f} s: {link_rate:.0f} MiB/s "
          f"(sent {moved['sent'] / 2**20:.0f} MiB, received {moved['received'] / 2**20:.0f} MiB; "
          f"{', '.join(f'{k} {v:.2f}' for k, v in moved['timings'].items())})")
    print(f"ratio Link / scp throughput:      {link_rate / scp_rate:.2f}  (goal >= 0.6)")
    print(f"same cell, unchanged input:       {again:.2f} s = {again / first:.1%} of the first run  "
          f"(goal < 5%; sent {again_reply['metadata']['link']['sent']} B; "
          f"{', '.join(f'{k} {v:.2f}' for k, v in again_reply['metadata']['link']['timings'].items())})")
    print(f"20 small variables:               {median_ms(with_vars) - median_ms(warm):+.1f} ms "
          f"({median_ms(with_vars):.1f} against {median_ms(warm):.1f} ms)")


if __name__ == "__main__":
    main()
