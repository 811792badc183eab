"""The supervisor that starts one ipykernel on a host and guarantees its end.

This file is self-contained and runs on the host (Python >= 3.8, with only
ipykernel and dill installed): a transport runs it as

    exec PYTHON -c SOURCE WORKDIR CONNECTION_FILE AGENT_FILE DEAD_AFTER [IPYKERNEL_ARGS...]

in a pty (ssh) or as a child process (process transport). The supervisor forks
the kernel into a process group of its own and then:

- reports on its stdout, one ``LINK <WORD> <json>`` line each: ``HELLO`` (pid,
  versions, missing modules), ``READY`` (the ports the kernel bound, read
  back from its connection file), ``EXIT`` (how the kernel ended);
- reads its stdin: an empty line is a keepalive, ``INT``/``TERM``/``KILL``
  signal the kernel. On end of file, or no line for DEAD_AFTER seconds (the
  router died or the network vanished), it kills the kernel's process group;
- when the kernel exits, kills what is left of its process group, reports
  ``EXIT`` and exits, so the transport sees the exit only once every process
  of the kernel is gone.

The kernel's own stdin is /dev/null: nothing it or the user's subprocesses
read can steal the supervisor's keepalives.

Under Slurm the supervisor runs on a node the router did not choose, so the
connection file cannot be written beforehand. CONNECTION_FILE is then
``node:KEY_FILE``: the supervisor reads the session key from KEY_FILE (mode
0600 in the shared work directory), picks the node's address (the one that
routes back to the login node srun ran on), writes the connection file itself
in a node-local temporary directory, mode 0600, and adds ``ip`` and ``job``
to its reports. The directory is removed when the kernel ends.
"""

import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time

SIGNALS = {"INT": signal.SIGINT, "TERM": signal.SIGTERM, "KILL": signal.SIGKILL}


def report(fd, word, payload):
    # One write (atomic on pipes and ttys), starting on a fresh line: the kernel
    # may have left a line unfinished on the same output before it captured it.
    os.write(fd, ("\nLINK %s %s\n" % (word, json.dumps(payload))).encode())


def killpg(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def become_subreaper():
    """Adopt orphaned descendants (Linux), so none outlives the kernel unreaped."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def my_children():
    me = str(os.getpid())
    out = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for entry in entries:
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    if f.read().rsplit(")", 1)[1].split()[1] == me:
                        out.append(int(entry))
            except (OSError, IndexError):
                pass
    return out


def reap_all(pgid, timeout):
    """Kill the kernel's group and every adopted descendant; reap them all."""
    killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return  # no child left: the usual case, at once
        if pid:
            continue
        for child in my_children():  # adopted orphans of other groups
            try:
                os.kill(child, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.002)


def check_modules():
    import importlib.util

    found, missing = {}, []
    for name in ("ipykernel", "dill", "xxhash"):
        spec = importlib.util.find_spec(name)
        if spec is not None:
            found[name] = spec.origin or ""
        elif name != "xxhash":
            missing.append(name)
    return found, missing


#: What the kernel process runs: a fresh interpreter that loads the agent and
#: starts ipykernel. However ipykernel ends, the process ends as python would
#: (atexit hooks run, every open file flushed) but skips tearing down the
#: thousands of modules IPython imported, which takes 150 ms and helps no one.
KERNEL_MAIN = """
import sys, types
agent_file, conn_file = sys.argv[1], sys.argv[2]
with open(agent_file) as f:
    source = f.read()
agent = types.ModuleType("__link_agent__")
agent.__file__ = agent_file
exec(compile(source, agent_file, "exec"), agent.__dict__)
sys.modules["__link_agent__"] = agent
if sys.path and sys.path[0] == "":
    del sys.path[0]
from ipykernel.kernelapp import IPKernelApp
IPKernelApp.launch_instance(argv=[
    "-f", conn_file,
    "--IPKernelApp.exec_lines=['__import__(\\"__link_agent__\\").install(get_ipython())']",
    *sys.argv[3:],
])
agent.exit_now(0)
"""


def run_kernel(conn_file, agent_file, kernel_args):
    """In the forked child: become the kernel, in a process group of its own."""
    os.setpgid(0, 0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    parent = "--IPKernelApp.parent_handle=%d" % os.getppid()  # it dies with its supervisor
    argv = [sys.executable, "-c", KERNEL_MAIN, agent_file, conn_file, parent] + list(kernel_args)
    os.execv(sys.executable, argv)


def node_address():
    """This node's address as the login node sees it (127.0.0.1 outside Slurm)."""
    peer = os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "")
    if peer:
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            probe.connect((peer, 9))  # UDP: no packet is sent, the route is chosen
            return probe.getsockname()[0]
        except OSError:
            pass
        finally:
            probe.close()
    return "127.0.0.1"


def write_node_connection_file(key_file):
    """Write the kernel's connection file on this node; return (path, its dir, ip)."""
    with open(key_file) as f:
        key = f.read().strip()
    ip = node_address()
    directory = tempfile.mkdtemp(prefix="link-kernel-")  # mode 0700, node-local
    path = os.path.join(directory, "kernel.json")
    info = {"ip": ip, "transport": "tcp", "key": key, "signature_scheme": "hmac-sha256",
            "kernel_name": ""}
    for name in ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port"):
        info[name] = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
    return path, directory, ip


def announce_ports(fd, conn_file, pid, stop, extra):
    """Report READY once the kernel has written the ports it bound."""
    while not stop.is_set():
        try:
            with open(conn_file) as f:
                info = json.load(f)
        except (OSError, ValueError):
            info = {}
        ports = dict((k, v) for k, v in info.items() if k.endswith("_port"))
        if ports and all(ports.values()):
            payload = {"pid": pid, "ports": ports}
            payload.update(extra)
            report(fd, "READY", payload)
            return
        stop.wait(0.005)


def watch_router(fd, pgid, dead_after, stop):
    """Kill the kernel when the router stops talking."""
    import select

    buf = b""
    while not stop.is_set():
        ready, _, _ = select.select([fd], [], [], dead_after)
        if not ready:
            killpg(pgid, signal.SIGKILL)
            return
        try:
            data = os.read(fd, 4096)
        except OSError:
            data = b""
        if not data:
            killpg(pgid, signal.SIGKILL)
            return
        buf += data.replace(b"\r", b"\n")
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            sig = SIGNALS.get(line.strip().decode("ascii", "replace"))
            if sig == signal.SIGINT:
                os.kill(pgid, sig)  # the kernel only, as a frontend's interrupt does
            elif sig is not None:
                killpg(pgid, sig)


def main(argv):
    workdir, conn_file, agent_file, dead_after = argv[0], argv[1], argv[2], float(argv[3])
    kernel_args = argv[4:]
    if workdir:
        os.chdir(workdir)
    out = os.dup(1)
    control = os.dup(0)
    try:
        import termios
        import tty

        if os.isatty(control):
            tty.setraw(control)
    except (ImportError, OSError):
        pass
    found, missing = check_modules()
    extra, node_dir = {}, None
    if conn_file.startswith("node:"):
        conn_file, node_dir, ip = write_node_connection_file(conn_file[len("node:"):])
        extra = {"ip": ip, "job": os.environ.get("SLURM_JOB_ID", "")}
    hello = {
        "pid": os.getpid(),
        "python": "%d.%d.%d" % sys.version_info[:3],
        "executable": sys.executable,
        "modules": found,
        "missing": missing,
    }
    hello.update(extra)
    report(out, "HELLO", hello)
    if missing:
        if node_dir is not None:  # the connection file holds the key: it goes too
            shutil.rmtree(node_dir, ignore_errors=True)
        report(out, "EXIT", {"status": 3, "reason": "missing " + ", ".join(missing)})
        return 3
    become_subreaper()
    pid = os.fork()
    if pid == 0:
        os.close(out)
        os.close(control)
        try:
            run_kernel(conn_file, agent_file, kernel_args)
        finally:
            os._exit(1)
    try:
        os.setpgid(pid, pid)
    except OSError:
        pass
    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, f: killpg(pid, signal.SIGKILL))
    stop = threading.Event()
    threading.Thread(
        target=announce_ports, args=(out, conn_file, pid, stop, extra), daemon=True
    ).start()
    threading.Thread(target=watch_router, args=(control, pid, dead_after, stop), daemon=True).start()
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    stop.set()
    reap_all(pid, 5.0)
    if node_dir is not None:
        shutil.rmtree(node_dir, ignore_errors=True)
    code = os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") else status
    report(out, "EXIT", {"status": code})
    return 0


if __name__ == "__main__":
    status = main(sys.argv[1:])
    # Everything of the kernel is reaped and reported: skip interpreter
    # teardown, so the transport sees this process end at once.
    os._exit(status)
