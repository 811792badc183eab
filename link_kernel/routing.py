"""The routing grammar: which target a cell runs on, and how.

Pure: no I/O, no state. The kernel calls :func:`parse` on every cell and
:func:`resolve` with the targets it knows.

A cell's first line may be a routing comment::

    # link: gpu                          one target
    # link: gpu|tesla|local              a fallback chain, first reachable wins
    # link: gpu keep                     keep the host's kernel for the next cells
    # link: gpu kernel=torch-2           a remote kernelspec
    # link: gpu in=df,model out=model    name the variables instead of detecting them
    # link: gpu files=off timeout=3600
    # link: cluster gpus=1 cpus=8 mem=32G time=2:00:00 partition=gpu
    # link: files=off                    options only: the notebook's default target
    # link: name=load                    a pipeline component (see DESIGN.md "Pipelines")
    # link: gpu name=train after=load,clean   on gpu, after two parent components
    # link: name=report after=train cache=off always runs, never cached

Lines that start with ``%link`` are router commands (see :data:`COMMANDS`); they
are taken out of the code (blanked, so line numbers keep matching the cell)
and never reach a kernel.
"""

from __future__ import annotations

import difflib
import keyword
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from .errors import RoutingError, UnknownTargetError

LOCAL = "local"

_COMMENT = re.compile(r"[ \t]*#[ \t]*link[ \t]*:(?P<rest>.*)")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@+-]*")
_COUNT = re.compile(r"[0-9]+")
_MEM = re.compile(r"[0-9]+[KMGTkmgt]?")
_TIME = re.compile(r"([0-9]+-)?[0-9]+(:[0-9]{1,2}){0,2}")

#: Router commands and how many arguments each takes (min, max).
COMMANDS: dict[str, tuple[int, int]] = {
    "status": (0, 0),
    "hosts": (0, 0),
    "default": (1, 1),
    "release": (0, 1),
    "sync": (0, 1),
    "help": (0, 0),
    "cache": (0, 2),
    "pipeline": (0, 0),
    "run": (0, 1),
}

#: Options of a routing comment. ``keep`` is a flag; the others are key=value.
OPTIONS = (
    "keep",
    "kernel",
    "in",
    "out",
    "files",
    "timeout",
    "gpus",
    "cpus",
    "mem",
    "time",
    "partition",
    "name",
    "after",
    "cache",
)
#: Options that ask a scheduler for resources; they travel as strings.
RESOURCE_OPTIONS = ("gpus", "cpus", "mem", "time", "partition")


@dataclass(frozen=True)
class Route:
    """Where and how one cell runs.

    ``targets`` is empty when the cell named none: the notebook's default applies.
    ``inputs``/``outputs`` are None when the names are to be detected from the code.
    """

    targets: tuple[str, ...] = ()
    keep: bool = False
    kernel: str | None = None
    inputs: tuple[str, ...] | None = None
    outputs: tuple[str, ...] | None = None
    files: bool = True
    timeout: float | None = None
    resources: tuple[tuple[str, str], ...] = ()
    commented: bool = False
    #: Pipeline: the component's name, its parents' names, whether results are cached.
    name: str | None = None
    after: tuple[str, ...] = ()
    cache: bool = True

    @property
    def is_local(self) -> bool:
        return self.targets == (LOCAL,)

    def with_targets(self, targets: Iterable[str]) -> Route:
        return replace(self, targets=tuple(targets))


@dataclass(frozen=True)
class Command:
    """One ``%link NAME ARGS...`` line."""

    name: str
    args: tuple[str, ...] = ()
    lineno: int = 1


@dataclass(frozen=True)
class Cell:
    """A cell split into its router commands, its route and the code a kernel runs."""

    route: Route
    code: str
    commands: tuple[Command, ...] = field(default=())

    @property
    def has_code(self) -> bool:
        """Whether anything but the routing comment and blank lines is left to run."""
        lines = self.code.splitlines()
        if self.route.commented:
            lines = lines[1:]
        return any(line.strip() for line in lines)

    @property
    def kernel_code(self) -> str | None:
        """The code a kernel must get instead of the cell, or None for the cell itself.

        IPython takes a cell magic (``%%time``) only from the first non-blank
        line, so behind a routing comment the comment line is blanked (the
        line count stays, and so do line numbers).
        """
        if not self.route.commented:
            return None
        lines = self.code.splitlines(keepends=True)
        rest = "".join(lines[1:])
        if not rest.lstrip().startswith("%%"):
            return None
        ending = lines[0][len(lines[0].rstrip("\r\n")) :]
        return ending + rest


_MARKERS = ("<<<<<<< ", "=======", ">>>>>>> ")


def conflict_line(cell: str) -> int | None:
    """The line number (from 1) of the first ``<<<<<<< `` line if ``cell`` holds all three
    merge conflict markers at line starts (``<<<<<<< ``, ``=======``, ``>>>>>>> ``), else None.

    All three must be there, so a lone ``=======`` (a reST underline) is ordinary text.
    """
    if "=======" not in cell:
        return None
    first = None
    seen = [False, False, False]
    for number, line in enumerate(cell.splitlines(), 1):
        for index, marker in enumerate(_MARKERS):
            if line.startswith(marker):
                seen[index] = True
                if index == 0 and first is None:
                    first = number
    return first if all(seen) else None


def parse(cell: str) -> Cell:
    """Split ``cell`` into commands, route and code; raise RoutingError if malformed.

    The returned code keeps every line of the cell (``%link`` lines become
    empty lines), so tracebacks still point at the cell's own line numbers.
    """
    commands: list[Command] = []
    code = cell
    # Lines end where IPython's transformers end them (str.splitlines), and each
    # keeps its own line ending, so blanking changes nothing but the command text.
    lines = cell.splitlines(keepends=True)
    if "%link" in cell:
        for i, line in enumerate(lines):
            text = _body(line)
            if text.startswith("%link") and (len(text) == 5 or text[5].isspace()):
                commands.append(_parse_command(text, i + 1))
                lines[i] = line[len(text) :]
        if commands:
            code = "".join(lines)
    first = _body(lines[0]) if lines else ""
    match = _COMMENT.fullmatch(first)
    route = _parse_route(match.group("rest")) if match else Route()
    return Cell(route=route, code=code, commands=tuple(commands))


def route_tokens(line: str) -> list[str] | None:
    """The words of the routing comment ``line`` (``gpu|local``, ``name=load``, ...), or
    None when it is not one. Nothing is checked (:func:`parse` does): the notebook merge
    merges a line by these words even when the grammar would refuse it."""
    match = _COMMENT.fullmatch(line)
    if match is None:
        return None
    text = _strip_trailing_comment(match.group("rest")).strip()
    return re.sub(r"\s*\|\s*", "|", text).split()


def _body(line: str) -> str:
    """``line`` without its line ending."""
    parts = line.splitlines()
    return parts[0] if parts else ""


def parse_targets(text: str) -> tuple[str, ...]:
    """Parse a chain such as ``gpu|tesla|local``."""
    names = tuple(part.strip() for part in text.split("|"))
    for name in names:
        if not name:
            msg = f"empty target in {text!r}: write targets as 'gpu|tesla|local'"
            raise RoutingError(msg)
        if not _NAME.fullmatch(name):
            msg = (
                f"bad target name {name!r}: start with a letter, digit or '_', "
                "then use letters, digits, '_', '.', '-', '@', '+'"
            )
            raise RoutingError(msg)
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        msg = f"target {twice[0]!r} appears twice in {text!r}: name each target once"
        raise RoutingError(msg)
    return names


def resolve(targets: tuple[str, ...], known: Iterable[str]) -> tuple[str, ...]:
    """Check every target of a chain against ``known``; return the chain.

    The whole chain is checked before anything runs, so a typo late in the
    chain is reported even when an earlier target would have been reachable.
    """
    known = list(dict.fromkeys([LOCAL, *known]))
    for target in targets:
        if target not in known:
            raise UnknownTargetError(target, _ranked(target, known))
    return targets


def _ranked(name: str, known: list[str]) -> list[str]:
    """Known names, the closest matches to ``name`` first, ``local`` last."""
    scores = {k: _similarity(name, k) for k in known if k != LOCAL}
    close = sorted((k for k in scores if scores[k] >= 0.6), key=lambda k: (-scores[k], k))
    rest = sorted(k for k in scores if scores[k] < 0.6)
    return [*close, *rest, LOCAL]


def _similarity(a: str, b: str) -> float:
    """How alike two names are, ignoring case (0 to 1, as difflib measures it)."""
    return difflib.SequenceMatcher(None, a.casefold(), b.casefold()).ratio()


def _parse_route(rest: str) -> Route:
    text = _strip_trailing_comment(rest).strip()
    if not text:
        msg = "empty routing comment: name a target, as in '# link: gpu' or '# link: local'"
        raise RoutingError(msg)
    # 'gpu | tesla' is the chain 'gpu|tesla'.
    tokens = re.sub(r"\s*\|\s*", "|", text).split()
    targets: tuple[str, ...] = ()
    if "=" not in tokens[0]:
        if tokens[0] == "keep":
            msg = "'keep' needs a target before it, as in '# link: gpu keep'"
            raise RoutingError(msg)
        targets = parse_targets(tokens[0])
        tokens = tokens[1:]
    values: dict[str, object] = {"targets": targets, "commented": True}
    resources: list[tuple[str, str]] = []
    seen: set[str] = set()
    for token in tokens:
        key, eq, value = token.partition("=")
        if key not in OPTIONS:
            msg = f"unknown option {key!r}; valid: {', '.join(sorted(OPTIONS))}"
            close = difflib.get_close_matches(key, OPTIONS, n=1)
            if close:
                msg += f" (did you mean {close[0]!r}?)"
            elif not eq and targets:
                msg += f" (a fallback chain is written '{targets[-1]}|{key}')"
            raise RoutingError(msg)
        if key in seen:
            msg = f"option {key!r} given twice"
            raise RoutingError(msg)
        seen.add(key)
        if key == "keep":
            if eq:
                msg = "'keep' is a flag: write '# link: gpu keep'"
                raise RoutingError(msg)
            values["keep"] = True
            continue
        if not eq:
            msg = f"option {key!r} needs a value: {key}=VALUE"
            raise RoutingError(msg)
        if key in RESOURCE_OPTIONS:
            resources.append((key, resource_value(key, value)))
        else:
            values[_FIELD.get(key, key)] = _PARSERS[key](value)
    if values.get("keep") and not targets:
        msg = "'keep' needs a target before it, as in '# link: gpu keep'"
        raise RoutingError(msg)
    _check_component(values)
    return Route(resources=tuple(resources), **values)  # type: ignore[arg-type]


def _strip_trailing_comment(text: str) -> str:
    index = text.find("#")
    return text if index < 0 else text[:index]


def _names(key: str):
    def parse_names(value: str) -> tuple[str, ...]:
        """``a,b`` -> ("a", "b"); an empty value is the empty list (no variables)."""
        names = tuple(value.split(",")) if value else ()
        for name in names:
            if not name.isidentifier() or keyword.iskeyword(name):
                msg = f"bad name {name!r} in {key}={value}: give Python names separated by commas"
                raise RoutingError(msg)
            if names.count(name) > 1:
                msg = f"name {name!r} appears twice in {key}={value}: name each variable once"
                raise RoutingError(msg)
        return names

    return parse_names


def _files(value: str) -> bool:
    if value in ("on", "off"):
        return value == "on"
    msg = f"files={value!r}: use files=on or files=off"
    raise RoutingError(msg)


def _timeout(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0 or seconds != seconds or seconds == float("inf"):
        msg = f"timeout={value!r}: give a positive number of seconds"
        raise RoutingError(msg)
    return seconds


def _component_name(value: str) -> str:
    if not value.isidentifier() or keyword.iskeyword(value):
        msg = f"name={value!r}: give the component a Python name, such as name=load"
        raise RoutingError(msg)
    return value


def _after(value: str) -> tuple[str, ...]:
    if not value:
        msg = "after='': name the parent components, as in after=load,clean"
        raise RoutingError(msg)
    names = tuple(value.split(","))
    for name in names:
        if not name.isidentifier() or keyword.iskeyword(name):
            msg = (
                f"bad parent {name!r} in after={value}: give component names "
                "separated by commas, as in after=load,clean"
            )
            raise RoutingError(msg)
        if names.count(name) > 1:
            msg = f"parent {name!r} appears twice in after={value}: name each parent once"
            raise RoutingError(msg)
    return names


def _cache(value: str) -> bool:
    if value in ("on", "off"):
        return value == "on"
    msg = f"cache={value!r}: use cache=on or cache=off"
    raise RoutingError(msg)


def _check_component(values: dict[str, object]) -> None:
    """after= and cache= belong to a component: they need name=, which is not a parent."""
    name = values.get("name")
    for key, given in (("after", "after" in values), ("cache", "cache" in values)):
        if given and name is None:
            msg = (
                f"{key}= is for pipeline components: name this cell too, "
                f"as in '# link: name=NAME {key}=...'"
            )
            raise RoutingError(msg)
    if name is not None and name in values.get("after", ()):  # type: ignore[operator]
        msg = f"component {name!r} names itself in after=: a component cannot be its own parent"
        raise RoutingError(msg)


def _kernel(value: str) -> str:
    if not _NAME.fullmatch(value):
        msg = f"kernel={value!r}: give a kernelspec name such as kernel=python3"
        raise RoutingError(msg)
    return value


def resource_value(key: str, value: str) -> str:
    """``value`` if it suits the resource option ``key``, else a RoutingError."""
    ok = {
        "gpus": lambda v: _COUNT.fullmatch(v) is not None,
        "cpus": lambda v: _COUNT.fullmatch(v) is not None and int(v) > 0,
        "mem": lambda v: _MEM.fullmatch(v) is not None,
        "time": lambda v: _TIME.fullmatch(v) is not None,
        "partition": lambda v: _NAME.fullmatch(v) is not None,
    }[key](value)
    if not ok:
        examples = {"gpus": "1", "cpus": "8", "mem": "32G", "time": "2:00:00", "partition": "gpu"}
        msg = f"{key}={value!r}: expected a value such as {key}={examples[key]}"
        raise RoutingError(msg)
    return value


_FIELD = {"in": "inputs", "out": "outputs"}
_PARSERS = {
    "kernel": _kernel,
    "in": _names("in"),
    "out": _names("out"),
    "files": _files,
    "timeout": _timeout,
    "name": _component_name,
    "after": _after,
    "cache": _cache,
}


def _parse_command(line: str, lineno: int) -> Command:
    words = line.split()
    if len(words) == 1:
        return Command("help", (), lineno)
    name, args = words[1], tuple(words[2:])
    if name not in COMMANDS:
        msg = f"unknown command '%link {name}'; valid: {', '.join(sorted(COMMANDS))}"
        raise RoutingError(msg)
    low, high = COMMANDS[name]
    usage = _USAGE.get(name, f"%link {name}")
    if not low <= len(args) <= high:
        msg = f"wrong arguments to '%link {name}': usage is '{usage}'"
        raise RoutingError(msg)
    # Check the names now, so a malformed line runs none of the cell's commands.
    if name == "default":
        parse_targets(args[0])
    elif name == "cache" and args and (args[0] != "clear" or not all(a.isidentifier() for a in args[1:])):
        msg = f"wrong arguments to '%link cache': usage is '{usage}'"
        raise RoutingError(msg)
    elif name == "run" and args and not args[0].isidentifier():
        msg = f"bad component name {args[0]!r} in '%link run': usage is '{usage}'"
        raise RoutingError(msg)
    elif args and not _NAME.fullmatch(args[0]):
        msg = f"bad alias {args[0]!r} in '%link {name}': usage is '{usage}'"
        raise RoutingError(msg)
    return Command(name, args, lineno)


_USAGE = {
    "default": "%link default TARGET",
    "release": "%link release [ALIAS]",
    "sync": "%link sync [ALIAS]",
    "cache": "%link cache [clear [NAME]]",
    "run": "%link run [NAME]",
}
