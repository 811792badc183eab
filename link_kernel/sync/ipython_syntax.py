"""IPython syntax as the plain Python statements it runs, for the cell analysis.

:mod:`.analysis` needs a cell as a Python syntax tree. This module makes one: it
empties the router's lines (``%link ...`` and the routing comment), runs IPython's
own input transformers (magics, ``!cmd``, ``x?`` become ``get_ipython()`` calls),
parses the result, and inserts before each magic call the statements the magic
runs in the user namespace, as far as known.

What a magic call gets before its own statement (which stays, and loads only
``get_ipython``, a name the analysis drops unless the cell itself names it):

- ``%time``, ``%%time``, ``%prun``, ``%%prun`` and ``%%capture``: the code they
  run, parsed in turn (``%%capture out`` adds ``out = None``);
- ``%timeit`` and ``%%timeit``: their setup and code, inside an :class:`_Isolated`
  statement, as they run in a function of their own (``-v name`` adds
  ``name = None``);
- ``x?``/``x??``: a load of ``x``;
- shell commands and the arguments of other magics: a load of each ``$name`` and
  each ``{expression}``, which IPython expands from the user namespace.

Options of ``%time``/``%timeit``/``%prun`` are recognised only before the code;
code that does not parse adds nothing.

This module owns that translation only. It may not decide which names a cell
reads or binds (that is :mod:`.analysis`, which imports this module, never the
reverse), and it does no I/O and holds no state. IPython is imported by the
caller, not here, so importing this module stays cheap.
"""

from __future__ import annotations

import ast
import re
import string
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from IPython.core.inputtransformer2 import TransformerManager


# -- Router lines ---------------------------------------------------------------------


_ROUTE_COMMENT = re.compile(r"[ \t]*#[ \t]*link[ \t]*:")  # as in routing


def _drop_router_lines(cell: str, *, route: bool = True) -> str:
    """``cell`` with its ``%link`` lines and (if ``route``) its routing comment emptied.

    Line numbers stay. IPython takes a cell magic only from the first line that
    is not blank, so ``# link: gpu`` followed by ``%%time`` is a ``%%time`` cell
    for the analysis, as it is for a kernel that gets the cell without its comment.
    """
    if "%link" not in cell and not (route and "link" in cell):
        return cell
    lines = cell.splitlines(keepends=True)
    for i, line in enumerate(lines):
        parts = line.splitlines()
        text = parts[0] if parts else ""
        command = text.startswith("%link") and (len(text) == 5 or text[5].isspace())
        if command or (route and i == 0 and _ROUTE_COMMENT.match(text)):
            lines[i] = line[len(text) :]
    return "".join(lines)


# -- Parsing, with magics replaced by the code they run ------------------------------

_IPYTHON_NAME = "get_ipython"

#: Options of the code-running magics, as getopt specs (IPython's own).
_TIMEIT_OPTIONS = "n:r:tcp:qov:"
_PRUN_OPTIONS = "D:l:rs:T:q"
_TIME_FLAGS = ("--no-raise-error",)
_CAPTURE_FLAGS = ("--no-stderr", "--no-stdout", "--no-display")
_PINFO = ("pinfo", "pinfo2")
_TOKEN = re.compile(r"\s*(\S+)")
_DOTTED = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)(?:\.[A-Za-z_][A-Za-z0-9_]*)*\s*$")
_DOLLAR = re.compile(r"(?<!\$)\$([A-Za-z_][A-Za-z0-9_]*)")


class _Isolated(ast.stmt):
    """Code that runs in a function scope of its own (``%timeit``): reads only."""

    _fields = ("body",)

    def __init__(self, body: list[ast.stmt]) -> None:
        super().__init__()
        self.body = body


class _Parser:
    """Transforms and parses cells, and replaces magic calls by the code they run."""

    def __init__(self, transformer: TransformerManager) -> None:
        self._transformer = transformer

    def parse(self, cell: str) -> ast.Module:
        """Parse one cell; raise SyntaxError if it is not Python after transformation."""
        with warnings.catch_warnings():
            # SyntaxWarnings (invalid escapes, `is` with a literal) are the kernel's to
            # show. catch_warnings swaps the process's filters: parse on one thread.
            warnings.simplefilter("ignore")
            source = self._transformer.transform_cell(cell)
            tree = ast.parse(source, "<cell>", "exec")
        tree.body = self._splice(tree.body)
        return tree

    def _code(self, text: str) -> list[ast.stmt]:
        """Statements of a magic's code, or none if it does not parse."""
        try:
            return self.parse(_drop_router_lines(text, route=False)).body
        except (SyntaxError, ValueError):
            return []

    def _splice(self, body: list[ast.stmt]) -> list[ast.stmt]:
        """``body`` with the code of each magic inserted before the magic's statement."""
        out: list[ast.stmt] = []
        for stmt in body:
            for field in ("body", "orelse", "finalbody"):
                block = getattr(stmt, field, None)
                if isinstance(block, list) and block and isinstance(block[0], ast.stmt):
                    setattr(stmt, field, self._splice(block))
            for part in (*getattr(stmt, "handlers", ()), *getattr(stmt, "cases", ())):
                part.body = self._splice(part.body)
            call = _magic_call(stmt)
            if call is not None:
                out.extend(self._expand(*call))
            out.append(stmt)
        return out

    def _expand(self, kind: str, args: list[str]) -> list[ast.stmt]:
        """The statements a magic call runs in the user namespace, as far as known."""
        if kind == "run_line_magic" and len(args) == 2:
            return self._line_magic(args[0], args[1])
        if kind == "run_cell_magic" and len(args) == 3:
            return self._cell_magic(args[0], args[1], args[2])
        if kind in ("system", "getoutput") and args:
            return _expansions(args[0])
        return []

    def _line_magic(self, name: str, line: str) -> list[ast.stmt]:
        if name == "time":
            return self._code(_strip_flags(line, _TIME_FLAGS))
        if name == "prun":
            parsed = _strip_options(line, _PRUN_OPTIONS)
            return self._code(parsed[1]) if parsed else []
        if name == "timeit":
            parsed = _strip_options(line, _TIMEIT_OPTIONS)
            return self._timeit(*parsed, "") if parsed else []
        if name in _PINFO:
            match = _DOTTED.match(line)
            return [_load_stmt(match.group(1))] if match else []
        return _expansions(line)

    def _cell_magic(self, name: str, line: str, cell: str) -> list[ast.stmt]:
        if name == "time":
            return self._code(cell)
        if name == "prun":
            parsed = _strip_options(line, _PRUN_OPTIONS)
            return self._code(parsed[1] + "\n" + cell) if parsed else []
        if name == "timeit":
            parsed = _strip_options(line, _TIMEIT_OPTIONS)
            return self._timeit(*parsed, cell) if parsed else []
        if name == "capture":
            rest = _strip_flags(line, _CAPTURE_FLAGS).split()
            stmts = self._code(cell)
            if rest and rest[0].isidentifier():
                stmts.append(_bind_stmt(rest[0]))
            return stmts
        return _expansions(line)

    def _timeit(self, options: dict[str, str], setup: str, cell: str) -> list[ast.stmt]:
        stmts: list[ast.stmt] = [_Isolated(self._code(setup) + self._code(cell))]
        saved = options.get("v", "")
        if saved.isidentifier():
            stmts.append(_bind_stmt(saved))
        return stmts


def _magic_call(stmt: ast.stmt) -> tuple[str, list[str]] | None:
    """(method, string arguments) if ``stmt`` is a ``get_ipython().method(...)`` line."""
    if not isinstance(stmt, (ast.Expr, ast.Assign)):
        return None
    call = stmt.value
    if not (
        isinstance(call, ast.Call)
        and isinstance(call.func, ast.Attribute)
        and isinstance(call.func.value, ast.Call)
        and isinstance(call.func.value.func, ast.Name)
        and call.func.value.func.id == _IPYTHON_NAME
    ):
        return None
    args = [a.value for a in call.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    if len(args) != len(call.args):
        return None
    return call.func.attr, args


def _strip_flags(line: str, flags: Iterable[str]) -> str:
    """``line`` without the leading tokens that are one of ``flags``."""
    pos = 0
    while (match := _TOKEN.match(line, pos)) and match.group(1) in flags:
        pos = match.end()
    return line[pos:].lstrip()


def _strip_options(line: str, spec: str) -> tuple[dict[str, str], str] | None:
    """Split ``line`` into getopt-style leading options and the rest; None if invalid."""
    options: dict[str, str] = {}
    pos = 0
    while (match := _TOKEN.match(line, pos)) and match.group(1).startswith("-"):
        token = match.group(1)
        pos = match.end()
        if token == "--":
            break
        if token.startswith("--") or token == "-":
            return None
        for i, letter in enumerate(token[1:], start=1):
            at = spec.find(letter)
            if letter == ":" or at < 0:
                return None
            if spec[at + 1 : at + 2] != ":":
                options[letter] = ""
                continue
            value = token[i + 1 :]
            if not value:
                following = _TOKEN.match(line, pos)
                if following is None:
                    return None
                value, pos = following.group(1), following.end()
            options[letter] = value
            break
    return options, line[pos:].lstrip()


def _expansions(text: str) -> list[ast.stmt]:
    """Loads of what IPython expands in ``text``: ``$name`` and ``{expression}``."""
    stmts: list[ast.stmt] = [_load_stmt(name) for name in _DOLLAR.findall(text)]
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(text) if field]
    except ValueError:
        fields = []
    for field in fields:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                expression = ast.parse(field.strip(), mode="eval").body
        except (SyntaxError, ValueError):
            continue
        stmts.append(ast.Expr(expression))
    return stmts


def _load_stmt(name: str) -> ast.stmt:
    return ast.Expr(ast.Name(name, ast.Load()))


def _bind_stmt(name: str) -> ast.stmt:
    return ast.Assign([ast.Name(name, ast.Store())], ast.Constant(None))
