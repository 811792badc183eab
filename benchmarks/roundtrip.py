"""Local cell round trip: Link (hybrid) against a plain ipykernel, in one run.

    python benchmarks/roundtrip.py [-n 400]

Starts both kernels from their kernelspecs (``link`` and a plain ipykernel on
this python), warms them up, then times ``1+1`` from execute_request until both
the execute_reply and the idle status have arrived. The two kernels take turns
in blocks of 20 requests so that drift in the machine's load hits both alike.
Prints each median and the ratio Link / ipykernel (goal: at most 1.15).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import zmq
from jupyter_client.kernelspec import KernelSpec
from jupyter_client.manager import KernelManager
from jupyter_client.session import Session


class RawClient:
    """The leanest client: a DEALER and a SUB socket and a Session."""

    def __init__(self, km: KernelManager) -> None:
        info = km.get_connection_info(session=False)
        self.session = Session(key=info["key"], signature_scheme=info["signature_scheme"])
        self.ctx = zmq.Context()
        self.shell = self.ctx.socket(zmq.DEALER)
        self.shell.connect(f"tcp://{info['ip']}:{info['shell_port']}")
        self.iopub = self.ctx.socket(zmq.SUB)
        self.iopub.setsockopt(zmq.SUBSCRIBE, b"")
        self.iopub.connect(f"tcp://{info['ip']}:{info['iopub_port']}")
        self.poller = zmq.Poller()
        self.poller.register(self.shell, zmq.POLLIN)
        self.poller.register(self.iopub, zmq.POLLIN)

    def roundtrip(self, code: str = "1+1") -> float:
        start = time.perf_counter()
        msg = self.session.send(
            self.shell,
            "execute_request",
            {"code": code, "silent": False, "store_history": True, "user_expressions": {},
             "allow_stdin": False, "stop_on_error": True},
        )
        msg_id = msg["header"]["msg_id"]
        replied = idle = False
        while not (replied and idle):
            events = dict(self.poller.poll(10_000))
            if not events:
                raise TimeoutError("no answer within 10 s")
            if self.shell in events:
                _, frames = self.session.feed_identities(self.shell.recv_multipart())
                reply = self.session.deserialize(frames)
                replied = reply["parent_header"]["msg_id"] == msg_id or replied
            if self.iopub in events:
                _, frames = self.session.feed_identities(self.iopub.recv_multipart())
                out = self.session.deserialize(frames)
                if (
                    out["parent_header"].get("msg_id") == msg_id
                    and out["msg_type"] == "status"
                    and out["content"]["execution_state"] == "idle"
                ):
                    idle = True
        return time.perf_counter() - start

    def close(self) -> None:
        self.shell.close(0)
        self.iopub.close(0)
        self.ctx.term()


def start(km: KernelManager) -> RawClient:
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    kc.stop_channels()
    client = RawClient(km)
    time.sleep(0.5)  # let the SUB subscription settle
    return client


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=400, help="timed round trips per kernel")
    parser.add_argument("--warmup", type=int, default=50)
    args = parser.parse_args()

    plain = KernelManager(kernel_name="python3")
    plain._kernel_spec = KernelSpec(
        argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        display_name="ipykernel", language="python",
    )
    link = KernelManager(kernel_name="link")
    clients = {"ipykernel": start(plain), "link": start(link)}
    try:
        for client in clients.values():
            for _ in range(args.warmup):
                client.roundtrip()
        times: dict[str, list[float]] = {name: [] for name in clients}
        block = 20
        while len(times["link"]) < args.n:
            for name, client in clients.items():
                times[name].extend(client.roundtrip() for _ in range(block))
        medians = {name: statistics.median(ts) * 1000 for name, ts in times.items()}
        for name, ms in medians.items():
            print(f"{name:10s} median {ms:7.3f} ms  (n={len(times[name])})")
        ratio = medians["link"] / medians["ipykernel"]
        print(f"ratio link/ipykernel: {ratio:.3f}  (goal <= 1.15)")
    finally:
        for client in clients.values():
            client.close()
        plain.shutdown_kernel(now=False)
        link.shutdown_kernel(now=False)


if __name__ == "__main__":
    main()
