"""The supervisor that starts one ipykernel on a host and guarantees its end.

This file is self-contained and runs on the host (Python >= 3.8, with only
ipykernel and dill installed): a transport runs it as

    exec PYTHON -c SOURCE WORKDIR CONNECTION_FILE AGENT_FILE DEAD_AFTER FORK_SERVER [IPYKERNEL_ARGS...]

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

**The fork server.** A fresh interpreter spends 0.3-0.5 s importing ipykernel
before its kernel can answer, and more importing the notebook's libraries. With
CONNECTION_FILE ``serve:NAME`` this file runs as a host's fork server instead:
one long-lived process (supervised by the router like a kernel: keepalives on
its stdin, killed by silence or end of file) that imports ipykernel, the agent
and, on ``IMPORT ["module", ...]`` lines, the notebook's installed modules,
and listens on the abstract unix socket NAME (Linux; only its own user may
connect). A kernel's supervisor started with FORK_SERVER NAME (``-`` for
none) hands the fork server its stdin, stdout and stderr, argv and
environment; the fork server forks a child that runs this same supervisor on
those descriptors, and whose own child becomes the kernel without an exec.
The kernel is a process of its own as before (its memory is returned when it
ends), in its own process group, supervised exactly as an exec'd one; the
supervisor that asked only waits for the child's status and exits with it.
The fork server never imports a module that starts a thread or sets up a GPU
(CUDA does not survive a fork), refuses to fork once an imported package's
files have changed on disk (a fresh kernel would import the new ones): a
``CHECK`` line asks it that of the kernels it forked already (a standby), and
it answers ``CHECKED {"stale": module or null}``. When it refuses or is gone
the supervisor starts the kernel the usual way.
"""

import gc
import json
import os
import select
import shutil
import signal
import socket
import struct
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
    """Kill the kernel's group (None: no group) and every adopted descendant; reap them all."""
    if pgid is not None:
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


#: How a process becomes the kernel: it loads the agent file as ``__link_agent__``
#: and starts ipykernel. However ipykernel ends, the process ends as python would
#: (atexit hooks run, every open file flushed) but skips tearing down the
#: thousands of modules IPython imported, which takes 150 ms and helps no one.
#: One text, two uses: run here (the fork server loads the agent with it, and a
#: kernel forked from the server becomes the kernel with it), and run by a fresh
#: interpreter as KERNEL_MAIN.
KERNEL_CODE = r"""
import os, signal, sys, types


def load_agent(agent_file):
    '''The agent file as module __link_agent__, loaded once; '' leaves sys.path.'''
    if sys.path and sys.path[0] == "":
        del sys.path[0]
    agent = sys.modules.get("__link_agent__")
    if agent is not None and getattr(agent, "__file__", None) == agent_file:
        return agent
    with open(agent_file) as f:
        source = f.read()
    agent = types.ModuleType("__link_agent__")
    agent.__file__ = agent_file
    exec(compile(source, agent_file, "exec"), agent.__dict__)
    sys.modules["__link_agent__"] = agent
    return agent


def become_kernel(agent_file, conn_file, kernel_args):
    '''Start ipykernel on conn_file; never returns.

    In a process forked from the fork server, what a fresh interpreter has
    differently is set as it would be: Python's SIGINT handler, the generators
    of numpy and torch seeded afresh (random reseeds itself at a fork; the
    notebook's own generator states are carried into the cell anyway), and
    sys.argv.'''
    agent = load_agent(agent_file)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for name, reseed in (("numpy", lambda m: m.random.seed()), ("torch", lambda m: m.seed())):
        if name in sys.modules:
            try:
                reseed(sys.modules[name])
            except Exception:
                pass
    sys.argv = ["-c", agent_file, conn_file] + list(kernel_args)
    from ipykernel.kernelapp import IPKernelApp

    IPKernelApp.launch_instance(argv=[
        "-f", conn_file,
        "--IPKernelApp.exec_lines=['__import__(\"__link_agent__\").install(get_ipython())']",
    ] + list(kernel_args))
    agent.exit_now(0)
"""
exec(KERNEL_CODE)
#: What a fresh kernel interpreter runs: ``python -c KERNEL_MAIN AGENT_FILE CONN_FILE ARGS...``.
KERNEL_MAIN = KERNEL_CODE + "\nbecome_kernel(sys.argv[1], sys.argv[2], sys.argv[3:])\n"


def run_kernel(conn_file, agent_file, kernel_args):
    """In the forked child: become the kernel, in a process group of its own."""
    if FORKED.get("conn") is not None:
        FORKED["conn"].close()  # the fork server's line to the supervisor that asked
    os.setpgid(0, 0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    parent = "--IPKernelApp.parent_handle=%d" % os.getppid()  # it dies with its supervisor
    if FORKED.get("agent_file") == agent_file:  # all it needs is imported: no exec
        become_kernel(agent_file, conn_file, [parent] + list(kernel_args))
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


def raw(fd):
    """No echo, no line editing on a pty: keepalives and commands arrive as sent."""
    try:
        import tty

        if os.isatty(fd):
            tty.setraw(fd)
    except (ImportError, OSError):
        pass


def main(argv):
    workdir, conn_file, agent_file, dead_after = argv[0], argv[1], argv[2], float(argv[3])
    fork_server, kernel_args = argv[4], argv[5:]
    if conn_file.startswith("serve:"):
        return serve(workdir, conn_file[len("serve:"):], agent_file, dead_after)
    if workdir:
        os.chdir(workdir)
    out = os.dup(1)
    control = os.dup(0)
    raw(control)
    if fork_server != "-" and not FORKED:
        status = forked_by(fork_server, argv)
        if status is not None:
            return status
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
    if FORKED.get("agent_file") == agent_file:
        extra = dict(extra, forked=True)  # READY says the kernel is a fork of the server
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


# -- the fork server -----------------------------------------------------------------

#: Set in a child of the fork server: the agent file it loaded, and its line
#: ("conn") to the supervisor that asked for the kernel.
FORKED = {}

#: Never imported ahead: each starts threads at import or sets up a GPU, and
#: neither survives a fork. A cell that uses them imports them itself.
NOT_AHEAD = frozenset({
    "tensorflow", "keras", "jax", "jaxlib", "flax", "cupy", "pycuda", "numba", "ray",
    "mxnet", "paddle", "tensorrt", "distributed", "pyspark", "torch.cuda", "pynvml",
})

#: What a kernel's start imports beyond ipykernel.kernelapp: imported once in the fork
#: server, a forked kernel is ready 25 ms sooner.
KERNEL_IMPORTS = (
    "ipykernel.debugger", "IPython.core.completerlib", "IPython.core.debugger",
    "IPython.core.oinspect", "IPython.extensions.storemagic", "IPython.utils.wildcard",
    "pdb", "faulthandler", "tornado.platform.asyncio",
)

#: The stat of each top-level module's file, as imported (see stale()).
_FILES = {}


def note_files():
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None) if "." not in name else None
        if path and name not in _FILES:
            try:
                st = os.stat(path)
            except OSError:
                continue
            _FILES[name] = (path, st.st_mtime_ns, st.st_size, st.st_ino)


def stale():
    """The first imported module whose file changed on disk since, or None."""
    for name, (path, mtime, size, ino) in _FILES.items():
        try:
            st = os.stat(path)
        except OSError:
            return name
        if (st.st_mtime_ns, st.st_size, st.st_ino) != (mtime, size, ino):
            return name
    return None


def unsafe_to_fork():
    """Why a fork of this process would not be a sound kernel, or None."""
    if threading.active_count() > 1:
        names = ", ".join(t.name for t in threading.enumerate() if t is not threading.main_thread())
        return "a thread runs (%s)" % names
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None) if torch is not None else None
    try:
        if cuda is not None and cuda.is_initialized():
            return "CUDA is initialized"
    except Exception:
        pass
    return None


def load_for_kernels(agent_file):
    """Import what every kernel needs; the reason it cannot fork, or None."""
    agent = load_agent(agent_file)  # noqa: F821 (defined by KERNEL_CODE)
    import ipykernel.ipkernel  # noqa: F401
    import ipykernel.kernelapp  # noqa: F401
    import ipykernel.zmqshell  # noqa: F401

    for name in KERNEL_IMPORTS:  # what IPKernelApp.initialize imports (ipykernel 7)
        try:
            __import__(name)
        except Exception:
            pass
    try:  # each kernel would look up this host's addresses again (psutil: ~35 ms)
        from jupyter_client import localinterfaces

        localinterfaces.localhost()
    except Exception:
        pass
    agent.warm()
    note_files()
    return unsafe_to_fork()


def import_ahead(modules):
    """Import the notebook's modules, so that each kernel forked has them.

    Returns what was imported, what was not and why, and "unsafe" if an import
    left the process unfit to fork (the fork server then ends).
    """
    import importlib

    # as ipykernel sets it before any user code: matplotlib reads it at import
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    done, skipped = [], {}
    for name in modules:
        if not isinstance(name, str) or name in sys.modules:
            continue
        if name in NOT_AHEAD or name.partition(".")[0] in NOT_AHEAD:
            skipped[name] = "not imported ahead: it does not survive a fork"
            continue
        try:
            importlib.import_module(name)
        except BaseException as exc:  # SystemExit and the like from a module's import
            skipped[name] = "%s: %s" % (type(exc).__name__, exc)
            continue
        why = unsafe_to_fork()
        if why:
            return {"imported": done, "skipped": skipped, "unsafe": "importing %s: %s" % (name, why)}
        done.append(name)
    note_files()
    return {"imported": done, "skipped": skipped}


def forked_by(name, argv):
    """Have the fork server start this kernel; the status to exit with, or None.

    None (the server is not there, refused, or did not answer in time): the
    caller starts the kernel itself. The server's child commits only after
    this side says so, so exactly one of the two ever runs the kernel.
    """
    if not hasattr(socket, "send_fds"):
        return None
    line = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        line.settimeout(20.0)
        line.connect("\0" + name)
        payload = json.dumps({"argv": argv[:4] + ["-"] + argv[5:], "env": dict(os.environ)}).encode()
        socket.send_fds(line, [struct.pack("!I", len(payload)) + payload], [0, 1, 2])
        if line.recv(1) != b"+":
            line.close()
            return None
        line.sendall(b"!")
    except OSError:
        line.close()
        return None
    line.settimeout(None)
    data = b""
    while len(data) < 4:
        try:
            chunk = line.recv(4 - len(data))
        except InterruptedError:
            continue
        except OSError:
            break
        if not chunk:
            break
        data += chunk
    line.close()
    return struct.unpack("!i", data)[0] if len(data) == 4 else 1


def receive(conn):
    """(request, fds) from a supervisor, or None if it is not one of ours."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    if struct.unpack("3i", creds)[1] != os.getuid():
        return None
    data, fds, _, _ = socket.recv_fds(conn, 65536, 3)
    if len(data) < 4 or len(fds) != 3:
        for fd in fds:
            os.close(fd)
        return None
    size = struct.unpack("!I", data[:4])[0]
    data = data[4:]
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    try:
        return json.loads(data.decode()), fds
    except ValueError:
        for fd in fds:
            os.close(fd)
        return None


def start_supervisor(conn, fds, request, closing):
    """In a child of the fork server: become the kernel's supervisor, on its descriptors."""
    for fd in closing:
        os.close(fd)
    os.setsid()  # the fork server's terminal may close; this kernel's has its own life
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    os.environ.clear()
    os.environ.update(request["env"])
    conn.settimeout(20.0)
    conn.sendall(b"+")
    if conn.recv(1) != b"!":  # the supervisor gave up waiting: it starts the kernel itself
        return
    conn.settimeout(None)
    FORKED["conn"] = conn
    status = main(request["argv"])
    try:
        conn.sendall(struct.pack("!i", status))
    except OSError:
        pass


def hand_off(conn, listener, out, control):
    """Fork a supervisor for the kernel ``conn`` asks for; its pid, or None."""
    try:
        conn.settimeout(5.0)
        got = receive(conn)
    except (OSError, ValueError):
        got = None
    if got is None:
        conn.close()
        return None
    request, fds = got
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    gc.freeze()  # the child's collector leaves what is here alone: its pages stay shared
    try:
        pid = os.fork()
    except OSError:  # no memory, no process left: its supervisor starts the kernel itself
        pid = None
    if pid == 0:
        try:
            start_supervisor(conn, fds, request, [listener.fileno(), out, control])
        finally:
            os._exit(0)
    for fd in fds:
        os.close(fd)
    conn.close()
    return pid


def reap(children):
    """Reap ended children (and orphans adopted as subreaper), without waiting."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            children.clear()
            return
        if not pid:
            return
        children.discard(pid)


#: Why a fork server ends when the router closed its line or went silent.
GONE = "the router is gone"


def read(fd):
    try:
        return os.read(fd, 65536)
    except OSError:  # a closed pty reads as an error
        return b""


def serve(workdir, name, agent_file, dead_after):
    """Run as the host's fork server (see the module's docstring)."""
    if workdir:
        os.chdir(workdir)
    out = os.dup(1)
    control = os.dup(0)
    raw(control)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # its terminal's end is read as end of file
    found, missing = check_modules()
    report(out, "HELLO", {"pid": os.getpid(), "python": "%d.%d.%d" % sys.version_info[:3],
                          "executable": sys.executable, "modules": found, "missing": missing})
    why = "missing " + ", ".join(missing) if missing else None
    if why is None and not (sys.platform.startswith("linux") and hasattr(socket, "send_fds")):
        why = "a fork server needs Linux and Python 3.9 or later"
    if why is None:
        try:
            why = load_for_kernels(agent_file)
        except Exception as exc:
            why = "%s: %s" % (type(exc).__name__, exc)
    if why:
        report(out, "EXIT", {"status": 3, "reason": why})
        return 3
    FORKED["agent_file"] = agent_file
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0" + name)
    listener.listen(64)
    become_subreaper()
    report(out, "READY", {"pid": os.getpid(), "socket": name})
    children, buf, heard = set(), b"", time.monotonic()
    reason = None
    while reason is None:
        ready, _, _ = select.select([listener, control], [], [], 0.5)
        reap(children)
        if control in ready:
            data = read(control)
            if not data:
                reason = GONE
                break
            heard = time.monotonic()
            buf += data.replace(b"\r", b"\n")
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if line.startswith(b"IMPORT ") and reason is None:
                    result = import_ahead(json.loads(line[len(b"IMPORT "):].decode()))
                    report(out, "IMPORTED", result)
                    reason = result.get("unsafe")
                    heard = time.monotonic()
                elif line.strip() == b"CHECK":
                    changed = stale()
                    report(out, "CHECKED", {"stale": changed})
                    if changed is not None and reason is None:
                        reason = "the files of %s changed since it was imported" % changed
        elif time.monotonic() - heard > dead_after:
            reason = GONE
        if listener in ready and reason is None:
            try:
                conn, _ = listener.accept()
            except OSError:  # out of descriptors, say: the supervisor will give up and exec
                continue
            changed = stale()
            if changed is not None:
                conn.close()  # its supervisor starts the kernel itself
                reason = "the files of %s changed since it was imported" % changed
            else:
                pid = hand_off(conn, listener, out, control)
                if pid is not None:
                    children.add(pid)
    listener.close()  # no new kernel from here; those running end on their own lines
    report(out, "STALE", {"reason": reason})
    while children and reason is not GONE:  # retired: wait for the kernels it started
        ready, _, _ = select.select([control], [], [], 0.5)
        reap(children)
        if ready:
            if not read(control):
                break
            heard = time.monotonic()
        elif time.monotonic() - heard > dead_after:
            break
    deadline = time.monotonic() + 15.0  # each supervisor ends its kernel when its line ends
    while children and time.monotonic() < deadline:
        time.sleep(0.05)
        reap(children)
    reap_all(None, 5.0)  # what is left, and adopted orphans: killed, reaped
    report(out, "EXIT", {"status": 0, "reason": reason})
    return 0


if __name__ == "__main__":
    status = main(sys.argv[1:])
    # Everything of the kernel is reaped and reported: skip interpreter
    # teardown, so the transport sees this process end at once.
    os._exit(status)
