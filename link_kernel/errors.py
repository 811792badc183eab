"""Link's own failures, as a tree of typed exceptions.

Every error Link reports to a notebook is one of these. Its class name is the
``ename`` of the iopub ``error`` message; its text says what went wrong and its
``hint`` says what to do about it. Lower-level errors (paramiko, OSError, pickle)
are mapped onto this tree at the boundary with ``raise X(...) from exc``::

    LinkError
    ├── RoutingError                  the cell's routing comment or %link line is wrong
    │   ├── UnknownTargetError        a target that is neither local nor a known host
    │   └── ResourceOptionError       gpus=/cpus=/mem=/time=/partition= for a target without Slurm
    ├── ConflictMarkerError           the cell still holds a merge's conflict markers
    ├── GitSetupError                 link-kernel git: no repository, no git, a git call failed
    ├── PipelineError                 the notebook's pipeline cannot run as declared
    │   ├── UnknownComponentError     a parent (or %link run NAME) that no cell declares
    │   ├── PipelineCycleError        components that are each other's ancestors
    │   ├── DuplicateComponentError   two different cells declare one name
    │   └── ComponentFailedError      a parent component raised: the child did not run
    ├── ShareError                    a pipeline file or cache archive cannot be imported
    │   ├── PipelineFileError         a pipeline JSON file is broken, of another version, or wrong
    │   └── ArchiveError              a cache archive is damaged, tampered with, or unsafe
    ├── HostConfigError               the host registry or an ssh config entry is wrong
    ├── KernelSpecSourceError         the package's kernelspec folder is missing or unreadable
    ├── TransportError                reaching a host failed
    │   ├── HostUnreachableError      no TCP connection, or it went silent
    │   ├── AuthenticationError       the host refused every key we have
    │   │   └── PasswordRequiredError the host wants a password; Link never prompts
    │   ├── HostKeyError              the host's key is not the one we trust
    │   │   ├── UnknownHostKeyError   no key recorded for this host
    │   │   └── ChangedHostKeyError   a different key is recorded for this host
    │   └── ConnectionLostError       an established connection dropped mid-cell
    ├── KernelError                   a kernel behind the router misbehaved
    │   ├── CellInterrupted           interrupted before the remote kernel ran the cell
    │   ├── KernelStartError          a kernel did not start or never became ready
    │   ├── RemoteEnvironmentError    the host's python lacks ipykernel or dill, or differs
    │   └── KernelDiedError           a kernel process died while running a cell
    └── SyncError                     moving variables or files failed
        ├── SerializationError        a variable cannot be pickled or unpickled
        ├── TransferError             bytes did not arrive whole
        └── FileSyncError             a file could not be synced
"""

from __future__ import annotations


class LinkError(Exception):
    """Base of every error Link reports.

    ``hint`` is one sentence that tells the user what to do next; it is shown
    under the message in the notebook. ``ename`` is what the notebook shows as
    the error's name: the class name, unless a subclass says otherwise.
    """

    hint: str = ""
    ename: str = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class RoutingError(LinkError):
    hint = "Write the first line as '# link: TARGET[|TARGET...] [option=value ...]'."


class UnknownTargetError(RoutingError):
    def __init__(self, target: str, known: list[str]) -> None:
        self.target = target
        self.known = list(known)
        msg = f"unknown host {target!r}; known: {', '.join(self.known)}"
        super().__init__(
            msg, hint="Add it with 'link-kernel hosts add ALIAS [user@]HOST', or fix the name."
        )


class ResourceOptionError(RoutingError):
    """A scheduler option (``gpus=``, ...) on a cell whose target has no scheduler."""

    def __init__(self, target: str, option: str) -> None:
        self.target = target
        self.option = option
        msg = f"{option} asks a scheduler for resources, but {target!r} is not a Slurm host"
        super().__init__(
            msg,
            hint=f"Remove {option.split('=')[0]}= from the routing comment, or register a Slurm "
            "host with 'link-kernel hosts add ALIAS [user@]LOGIN --slurm'.",
        )


class ConflictMarkerError(LinkError):
    """The cell holds ``<<<<<<<``, ``=======`` and ``>>>>>>>`` lines (from line ``line``):
    a merge left it unresolved, and running either side's half would run neither."""

    def __init__(self, line: int) -> None:
        self.line = line
        msg = f"the cell holds merge conflict markers (from line {line}): it was not run"
        super().__init__(
            msg,
            hint="Keep the lines you want, delete the '<<<<<<<', '|||||||', '=======' and "
            "'>>>>>>>' lines, then run the cell again.",
        )


class GitSetupError(LinkError):
    hint = "Run it inside a git repository (or pass --global), with git on PATH."


class PipelineError(LinkError):
    hint = "Fix the routing comments of the pipeline's cells; nothing has run."


class UnknownComponentError(PipelineError):
    """``child`` (None for ``%link run NAME``) names ``name``, which no cell declares."""

    def __init__(self, name: str, known: list[str], child: str | None = None) -> None:
        self.name = name
        self.known = list(known)
        self.child = child
        listed = ", ".join(self.known) if self.known else "none yet"
        where = f"component {child!r} names an unknown parent" if child else "unknown component"
        msg = f"{where} {name!r}; known components: {listed}"
        super().__init__(
            msg,
            hint="Fix the name in after=, or run the cell that declares it with name= first.",
        )


class PipelineCycleError(PipelineError):
    """``cycle`` lists components in run order, the first repeated at the end."""

    def __init__(self, cycle: list[str]) -> None:
        self.cycle = list(cycle)
        msg = f"the pipeline has a cycle: {' -> '.join(self.cycle)}"
        super().__init__(msg, hint="Remove one of these parents from an after= to break it.")


class DuplicateComponentError(PipelineError):
    """Two different cells (``cells``: their ids or first lines) declare ``name``."""

    def __init__(self, name: str, cells: list[str]) -> None:
        self.name = name
        self.cells = list(cells)
        msg = f"two cells declare the component {name!r}: {' and '.join(self.cells)}"
        super().__init__(msg, hint="Give each of these cells its own name=, or delete one.")


class ComponentFailedError(PipelineError):
    """A parent component raised: ``content`` is its error as Jupyter shows it (its own
    ename, evalue and traceback, under a line naming it), which the cell shows as is."""

    hint = ""

    def __init__(self, content: dict) -> None:
        self.content = content
        super().__init__(str(content.get("evalue", "")))


class ShareError(LinkError):
    hint = "Nothing was written; ask the sender for a new export."


class PipelineFileError(ShareError):
    """A pipeline JSON file that ``link-kernel pipeline import`` refuses."""


class ArchiveError(ShareError):
    """A cache archive refused whole: ``member`` names the first bad member ("" for the
    archive itself)."""

    def __init__(self, message: str, member: str = "", *, hint: str | None = None) -> None:
        self.member = member
        super().__init__(message, hint=hint)


class HostConfigError(LinkError):
    hint = "Check the host with 'link-kernel hosts list' and 'link-kernel hosts check ALIAS'."


class KernelSpecSourceError(LinkError):
    hint = "Reinstall link-kernel (from a checkout: keep its kernelspecs/ folder)."


class TransportError(LinkError):
    def __init__(self, host: str, message: str, *, hint: str | None = None) -> None:
        self.host = host
        super().__init__(message, hint=hint)


class HostUnreachableError(TransportError):
    hint = "Check that the host is up and reachable, then run 'link-kernel hosts check ALIAS'."


class AuthenticationError(TransportError):
    hint = "Load a key the host accepts into ssh-agent, or set one with 'hosts add --identity'."


class PasswordRequiredError(AuthenticationError):
    pass


class HostKeyError(TransportError):
    pass


class UnknownHostKeyError(HostKeyError):
    def __init__(self, host: str, fingerprint: str) -> None:
        self.fingerprint = fingerprint
        super().__init__(
            host,
            f"host {host!r} is not in known_hosts (its key is {fingerprint})",
            hint=f"Verify the fingerprint, then run 'link-kernel hosts add {host} ... "
            f"--accept-new-host-key' or 'ssh {host}' once in a terminal.",
        )


class ChangedHostKeyError(HostKeyError):
    def __init__(self, host: str, got: str, expected: str) -> None:
        self.got = got
        self.expected = expected
        super().__init__(
            host,
            f"the host key of {host!r} changed: it is now {got}, known_hosts has {expected}",
            hint="This can be an attack. If the host was reinstalled, remove its old line from "
            "known_hosts ('ssh-keygen -R HOST') and connect again.",
        )


class ConnectionLostError(TransportError):
    hint = "The local namespace is unchanged; run the cell again once the host is back."


class KernelError(LinkError):
    pass


class CellInterrupted(KernelError):
    """The user interrupted a remote cell before its kernel ran it."""

    ename = "KeyboardInterrupt"
    hint = "The local namespace is unchanged."


class KernelStartError(KernelError):
    hint = "Run 'link-kernel hosts check ALIAS' to see which step fails."


class RemoteEnvironmentError(KernelError):
    hint = "Install ipykernel and dill into the host's python, or point --python at one that has them."


class KernelDiedError(KernelError):
    hint = "The local namespace is unchanged; the next cell gets a fresh kernel."


class SyncError(LinkError):
    pass


class SerializationError(SyncError):
    def __init__(self, name: str, type_name: str, reason: str, *, hint: str | None = None) -> None:
        self.name = name
        self.type_name = type_name
        self.reason = reason
        super().__init__(f"variable {name!r} ({type_name}) cannot be sent: {reason}", hint=hint)


class TransferError(SyncError):
    hint = "The local namespace is unchanged; run the cell again."


class FileSyncError(SyncError):
    hint = "Fix the file, or exclude it in .linkignore."
