"""Which module-level names a cell reads, binds and deletes.

Pure: no I/O, no state. The variable sync calls :func:`analyze` on a remote
cell's code; it sends the ``reads`` that exist in the local namespace, runs the
cell, then brings back the ``binds`` and deletes the ``deletes`` locally.

The cell runs at module level of an IPython kernel. It is first transformed
with IPython's own input transformers (magics, ``!cmd``, ``x?``), then parsed;
code that is not Python even then raises :class:`SyntaxError`. Lines that start
with ``%link`` are router commands and are ignored, and so is the routing
comment on the first line (a cell magic may follow it).

Reads are conservative. A name is a read when the cell may load it while it
still holds the value it had before the cell: anywhere in the cell where the
name refers to the module scope (top level, function and lambda bodies,
comprehensions, class bodies, decorators, defaults, annotations, f-strings,
match value patterns, ``global`` names), unless the cell has bound (or deleted)
it at top level on every path before that point. Top-level flow is followed
through ``if``/``for``/``while``/``try``/``with``/``match``: a name bound in
both arms of an ``if`` is bound after it, a name bound in a loop body is not
bound after the loop. The body of a function sees what was bound before its
``def``. An extra read only costs a transfer (builtins and unknown names are
dropped by the caller); a missing one would fail the remote cell with
NameError. So:

- ``x += 1``, ``x.attr = v``, ``x[i] = v``, ``del x.attr`` read ``x``;
- ``del x`` reads ``x`` too: the remote ``del`` needs the name to exist, though
  not its value. Such names are also in ``placeholders``: the caller may bind
  any stand-in object to them on the host instead of sending their value;
- ``get_ipython``, which the transformers write into the code, is not a read
  unless the cell itself names it.

Binds are the names whose state after the cell must be looked up in the
remote namespace: every name the cell may bind at module level (assignment,
augmented and annotated assignment with a value, ``def``, ``class``, imports,
``for``/``with``/walrus targets, match captures, ``x = !cmd``), names that a
function or class of the cell declares ``global`` and binds or deletes, and
names the cell may delete but does not delete for certain (a ``del`` in a
block, a ``del`` followed by a binding in a block, the end of an
``except E as e`` handler, which deletes ``e`` as Python does). Every such
maybe-deleted name is also a read (and a placeholder, unless the cell loads
its value), even where the cell bound it first, so the caller can read the
remote namespace after the cell without ambiguity:

- a name of ``binds`` that is present: fetch it, unless it is still the
  placeholder (the cell left it alone);
- absent, and it was sent (or a placeholder was): the cell deleted it; delete
  it locally;
- absent, and not sent: the cell did not bind it on the path it took; the
  local value, if any, stands.

Deletes are the names the cell leaves deleted for certain: deleted by a
top-level ``del`` that no later statement may undo. The caller deletes them
locally without looking. A name is never in both ``binds`` and ``deletes``.

All three describe a cell that runs to its end. After a cell that raised, a
``del`` may not have run: look ``deletes`` up as ``binds`` are.

``from m import *`` binds names no parser can know: ``star_import`` is True and
the caller should compare namespaces instead.

Magics are strings after the transformation; :mod:`.ipython_syntax` replaces the
ones it knows by the statements they run. As a best effort:

- ``%time``, ``%%time``, ``%prun``, ``%%prun`` and ``%%capture`` run their code
  in the user namespace: it is parsed and analyzed in place of the magic
  (``%%capture out`` also binds ``out``);
- ``%timeit`` and ``%%timeit`` run their code in a function of their own: its
  loads count as reads, its bindings are not (``-v name`` binds ``name``);
- ``x?``/``x??`` read ``x``;
- ``$name`` and ``{expression}`` in shell commands and in the arguments of
  other magics, which IPython expands from the user namespace, are reads.

Limits: other magics are opaque (``%run`` and ``%store -r`` bind names that are
not seen; cell magics such as ``%%bash`` have no Python body); options of
``%time``/``%timeit``/``%prun`` are recognised only before the code; names
reached dynamically (``eval``, ``exec``, ``getattr`` on the module) are not
seen, though a cell that lists the whole namespace (``globals()``, ``dir()``,
``%who``: see :attr:`Names.everything`) reads every name; annotations count as reads even where Python does not evaluate them
(``from __future__ import annotations``, local variable annotations).

This module owns the scope analysis: :class:`Names`, :func:`analyze` and the walk
over the syntax tree. It may not touch IPython syntax itself (router lines,
magics, shell commands): :mod:`.ipython_syntax` turns those into plain Python
statements first. No I/O, no state, and nothing of the kernel or the backends.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from .ipython_syntax import _IPYTHON_NAME, _drop_router_lines, _Isolated, _Parser


@dataclass(frozen=True)
class Names:
    """The module-level names a cell reads, binds and deletes (see the module docstring)."""

    #: Names the cell may take from the namespace as it was before the cell: their
    #: value, or only their existence for ``placeholders``.
    reads: frozenset[str]
    #: Names the cell may leave bound (or may leave deleted) at module level.
    binds: frozenset[str]
    #: Names the cell leaves deleted at module level for certain.
    deletes: frozenset[str]
    #: True when the cell runs ``from m import *``: it binds names not in ``binds``.
    star_import: bool = False
    #: Reads whose value the cell never uses: it only deletes them (or may), so they
    #: must exist before the cell, but any stand-in object will do.
    placeholders: frozenset[str] = frozenset()
    #: Module names the cell changes in place with an augmented assignment
    #: (``a *= 2``): a hint for loading them (the host copies them at once).
    inplace: frozenset[str] = frozenset()
    #: True when the cell looks at the whole namespace (``%who``, ``%whos``,
    #: ``%who_ls``, ``globals()``; ``dir()``, ``vars()``, ``locals()`` outside a
    #: function): it reads every name, not only those it names.
    everything: bool = False


def analyze(code: str) -> Names:
    """Return the names ``code`` reads, binds and deletes at module level.

    ``code`` is an IPython cell as the frontend sent it. Raises SyntaxError if
    it is not valid Python after IPython's transformations.
    """
    from IPython.core.inputtransformer2 import TransformerManager

    code = _drop_router_lines(code)
    tree = _Parser(TransformerManager()).parse(code)
    names = _Analyzer().module(tree.body)
    if _IPYTHON_NAME in names.reads and not re.search(r"\bget_ipython\b", code):
        names = replace(names, reads=names.reads - {_IPYTHON_NAME})
    return replace(names, inplace=_augmented(tree.body) & names.reads,
                   everything=_looks_at_everything(tree.body))


#: Magics that list the namespace, and calls that return it (``globals()`` anywhere;
#: the others only at module level, where their namespace is the module's).
_NAMESPACE_MAGICS = frozenset({"who", "whos", "who_ls"})
_NAMESPACE_CALLS = frozenset({"dir", "vars", "locals"})


def _looks_at_everything(body: list[ast.stmt]) -> bool:
    todo: list[tuple[ast.AST, bool]] = [(stmt, True) for stmt in body]
    while todo:
        node, module_level = todo.pop()
        if isinstance(node, ast.Call):
            func, args = node.func, node.args
            if isinstance(func, ast.Name) and not args and not node.keywords and (
                func.id == "globals" or (module_level and func.id in _NAMESPACE_CALLS)
            ):
                return True
            if isinstance(func, ast.Attribute) and func.attr == "run_line_magic" and args \
                    and isinstance(args[0], ast.Constant) and args[0].value in _NAMESPACE_MAGICS:
                return True
        inner = module_level and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                        ast.Lambda, ast.ClassDef))
        todo.extend((child, inner) for child in ast.iter_child_nodes(node))
    return False


def _augmented(body: list[ast.stmt]) -> frozenset[str]:
    """Names that module-level code augments (``a += b``), outside functions and classes."""
    found = set()
    todo: list[ast.AST] = list(body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
            found.add(node.target.id)
        todo.extend(ast.iter_child_nodes(node))
    return frozenset(found)


# -- Scopes -----------------------------------------------------------------------------

_ScopeKind = Literal["module", "function", "class", "comprehension"]
_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)
_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


@dataclass(frozen=True, slots=True)
class _Scope:
    """A namespace of the cell; ``bound`` are its local names (all bound names for a class)."""

    kind: _ScopeKind
    parent: _Scope | None = None
    bound: frozenset[str] = frozenset()
    globals: frozenset[str] = frozenset()
    nonlocals: frozenset[str] = frozenset()

    def refers_to_module(self, name: str) -> bool:
        """Whether a load of ``name`` in this scope reaches the module namespace."""
        scope: _Scope | None = self
        own = True
        while scope is not None and scope.kind != "module":
            if scope.kind == "class":
                # Only a class's own body sees its names; inner scopes skip it.
                if own and (name in scope.globals or name in scope.bound):
                    return True
                if own and name in scope.nonlocals:
                    return False
            else:
                if name in scope.globals:
                    return True
                if name in scope.nonlocals or name in scope.bound:
                    return False
            own = False
            scope = scope.parent
        return True


@dataclass(frozen=True, slots=True)
class _Ctx:
    """Where code runs.

    ``before`` are the module names the cell had bound or deleted, on every path,
    before this code can run: their value from before the cell is gone. ``depth``
    counts the blocks around a statement in its module or class body.
    """

    scope: _Scope
    before: frozenset[str] = frozenset()
    depth: int = 0

    def deeper(self) -> _Ctx:
        return _Ctx(self.scope, self.before, self.depth + 1)


def _collect(nodes: Iterable[ast.AST]) -> tuple[set[str], set[str], set[str]]:
    """Names bound, declared global and declared nonlocal in one scope's code.

    Does not enter nested scopes, except for what they evaluate in this one
    (decorators, defaults, a comprehension's walrus targets).
    """
    bound: set[str] = set()
    declared_global: set[str] = set()
    declared_nonlocal: set[str] = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if isinstance(node, _FUNCTIONS):
            bound.add(node.name)
            stack.extend(node.decorator_list)
            stack.extend(_signature_exprs(node.args, node.returns))
        elif isinstance(node, ast.ClassDef):
            bound.add(node.name)
            stack.extend([*node.decorator_list, *node.bases, *node.keywords])
        elif isinstance(node, ast.Lambda):
            stack.extend(_defaults(node.args))
        elif isinstance(node, _COMPREHENSIONS):
            # Targets are the comprehension's own; walrus targets are ours.
            for generator in node.generators:
                stack.extend([generator.iter, *generator.ifs])
            stack.extend(_comprehension_results(node))
        elif isinstance(node, _Isolated):
            pass
        elif type(node).__name__ == "TypeAlias":  # Python 3.12+: its value is lazy
            bound.add(node.name.id)  # type: ignore[attr-defined]
        elif isinstance(node, ast.Global):
            declared_global.update(node.names)
        elif isinstance(node, ast.Nonlocal):
            declared_nonlocal.update(node.names)
        elif isinstance(node, ast.Name):
            if not isinstance(node.ctx, ast.Load):
                bound.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update(_import_name(alias) for alias in node.names if alias.name != "*")
        else:
            name = getattr(node, "rest" if isinstance(node, ast.MatchMapping) else "name", None)
            if isinstance(name, str):  # ExceptHandler, MatchAs, MatchStar, MatchMapping
                bound.add(name)
            stack.extend(ast.iter_child_nodes(node))
    return bound, declared_global, declared_nonlocal


def _function_scope(args: ast.arguments, body: Sequence[ast.AST], parent: _Scope) -> _Scope:
    bound, declared_global, declared_nonlocal = _collect(body)
    params = {a.arg for a in _all_args(args)}
    return _Scope(
        "function",
        parent,
        frozenset((bound | params) - declared_global - declared_nonlocal),
        frozenset(declared_global),
        frozenset(declared_nonlocal),
    )


def _all_args(args: ast.arguments) -> list[ast.arg]:
    extra = [a for a in (args.vararg, args.kwarg) if a is not None]
    return [*args.posonlyargs, *args.args, *args.kwonlyargs, *extra]


def _defaults(args: ast.arguments) -> list[ast.expr]:
    return [*args.defaults, *(d for d in args.kw_defaults if d is not None)]


def _annotations(args: ast.arguments, returns: ast.expr | None) -> list[ast.expr]:
    found = [a.annotation for a in _all_args(args) if a.annotation is not None]
    return found + ([returns] if returns is not None else [])


def _signature_exprs(args: ast.arguments, returns: ast.expr | None) -> list[ast.expr]:
    return _defaults(args) + _annotations(args, returns)


def _comprehension_results(node: ast.expr) -> list[ast.expr]:
    if isinstance(node, ast.DictComp):
        return [node.key, node.value]
    return [node.elt]  # type: ignore[attr-defined]


def _import_name(alias: ast.alias) -> str:
    """The name an import binds: ``import a.b`` binds ``a``."""
    return alias.asname or alias.name.split(".")[0]


def _target_names(node: ast.AST) -> set[str]:
    return {
        n.id for n in ast.walk(node) if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)
    }


# -- The analysis -----------------------------------------------------------------------

#: A flow state: in a module body, names bound or deleted on every path so far;
#: in a class body, names that are in the class namespace on every path so far.
_Flow = set[str]
_Outcome = tuple[_Flow, bool]


class _Analyzer:
    """One walk over one cell's statements, in execution order."""

    def __init__(self) -> None:
        self._reads: set[str] = set()
        #: Module names whose old value the cell never loads, but which ``del`` needs.
        self._exists: set[str] = set()
        #: Last module-level event per name: "bind" (may be bound or deleted) or "delete".
        self._final: dict[str, str] = {}
        #: Module names bound or deleted by functions and classes (whenever they run).
        self._nested: set[str] = set()
        #: Module names the cell may delete, wherever.
        self._deleted: set[str] = set()
        self._star_import = False

    def module(self, body: list[ast.stmt]) -> Names:
        self._stmts(body, _Ctx(_Scope("module")), set())
        binds = {n for n, event in self._final.items() if event == "bind"} | self._nested
        deletes = {n for n, event in self._final.items() if event == "delete"} - binds
        # A name that may end deleted is sent, so that the caller can tell
        # "deleted by the cell" (sent, now absent) from "not bound on this path".
        exists = self._exists | (self._deleted & binds)
        return Names(
            reads=frozenset(self._reads | exists),
            binds=frozenset(binds),
            deletes=frozenset(deletes),
            star_import=self._star_import,
            placeholders=frozenset(exists - self._reads),
        )

    # Names --------------------------------------------------------------------------

    def _load(self, name: str, ctx: _Ctx, flow: _Flow, *, value: bool = True) -> None:
        """A load of ``name``; ``value`` is False where only its existence matters."""
        scope = ctx.scope
        if scope.kind == "module":
            old = name not in flow
        elif scope.kind == "class" and name in flow:
            old = False
        else:
            old = scope.refers_to_module(name) and name not in ctx.before
        if old:
            (self._reads if value else self._exists).add(name)

    def _store(self, name: str, ctx: _Ctx, flow: _Flow) -> None:
        scope = ctx.scope
        if scope.kind == "module":
            self._final[name] = "bind"
            flow.add(name)
        elif name in scope.globals:
            self._nested.add(name)
        elif scope.kind == "class":
            flow.add(name)

    def _delete(self, name: str, ctx: _Ctx, flow: _Flow, *, implicit: bool = False) -> None:
        """``del name``; ``implicit`` for the deletion that ends an ``except ... as name``."""
        scope = ctx.scope
        if scope.kind == "module" or name in scope.globals:
            if not implicit:
                self._load(name, ctx, flow, value=False)  # `del x` fails if x does not exist
            self._deleted.add(name)
        if scope.kind == "module":
            self._final[name] = "delete" if ctx.depth == 0 else "bind"
            flow.add(name)
        elif name in scope.globals:
            self._nested.add(name)
        elif scope.kind == "class":
            flow.discard(name)

    def _walrus(self, name: str, ctx: _Ctx, flow: _Flow, acc: set[str] | None) -> None:
        """``name := ...``: binds in the nearest scope that is not a comprehension."""
        scope = ctx.scope
        while scope.kind == "comprehension" and scope.parent is not None:
            scope = scope.parent  # ``acc`` is None there: a comprehension may not run
        if scope.kind == "module":
            self._final[name] = "bind"
        elif name in scope.globals:
            self._nested.add(name)
        if acc is not None and scope.kind in ("module", "class"):
            acc.add(name)

    def _nested_ctx(self, scope: _Scope, ctx: _Ctx, flow: _Flow) -> _Ctx:
        before = frozenset(flow) if ctx.scope.kind == "module" else ctx.before
        return _Ctx(scope, before)

    # Expressions --------------------------------------------------------------------

    def _expr(self, node: ast.AST | None, ctx: _Ctx, flow: _Flow) -> set[str]:
        """Visit an expression; return the names its walrus operators bind for certain."""
        acc: set[str] = set()
        if node is not None:
            self._visit([(node, ctx, flow, acc)])
        return acc

    def _visit(self, stack: list[tuple[ast.AST, _Ctx, _Flow, set[str] | None]]) -> None:
        # Iterative, so that long chains such as a + b + c + ... need no deep recursion.
        # ``acc`` is None where evaluation is conditional (walrus binds may not happen).
        while stack:
            node, ctx, flow, acc = stack.pop()
            if isinstance(node, ast.Name):
                if isinstance(node.ctx, ast.Load):
                    self._load(node.id, ctx, flow)
                elif isinstance(node.ctx, ast.Del):
                    self._delete(node.id, ctx, flow)
                else:
                    self._store(node.id, ctx, flow)
            elif isinstance(node, ast.NamedExpr):
                stack.append((node.value, ctx, flow, acc))
                if isinstance(node.target, ast.Name):
                    self._walrus(node.target.id, ctx, flow, acc)
            elif isinstance(node, ast.Lambda):
                stack.extend((d, ctx, flow, acc) for d in _defaults(node.args))
                scope = _function_scope(node.args, [node.body], ctx.scope)
                stack.append((node.body, self._nested_ctx(scope, ctx, flow), set(), None))
            elif isinstance(node, _COMPREHENSIONS):
                first, *others = node.generators
                stack.append((first.iter, ctx, flow, acc))
                bound = set().union(*(_target_names(g.target) for g in node.generators))
                scope = _Scope("comprehension", ctx.scope, frozenset(bound))
                inner = self._nested_ctx(scope, ctx, flow)
                parts = [first.target, *first.ifs, *_comprehension_results(node)]
                for generator in others:
                    parts.extend([generator.target, generator.iter, *generator.ifs])
                stack.extend((part, inner, set(), None) for part in parts)
            elif isinstance(node, ast.BoolOp):
                left, *rest = node.values
                stack.append((left, ctx, flow, acc))
                stack.extend((value, ctx, flow, None) for value in rest)
            elif isinstance(node, ast.IfExp):
                stack.append((node.test, ctx, flow, acc))
                stack.extend((branch, ctx, flow, None) for branch in (node.body, node.orelse))
            elif isinstance(node, ast.Compare):
                right, *rest = node.comparators
                stack.extend([(node.left, ctx, flow, acc), (right, ctx, flow, acc)])
                stack.extend((value, ctx, flow, None) for value in rest)
            else:
                stack.extend((child, ctx, flow, acc) for child in ast.iter_child_nodes(node))

    def _target(self, node: ast.AST, ctx: _Ctx, flow: _Flow) -> None:
        """Bind an assignment target; its attribute and subscript bases are loads."""
        if isinstance(node, ast.Name):
            self._store(node.id, ctx, flow)
        elif isinstance(node, (ast.Tuple, ast.List)):
            for element in node.elts:
                self._target(element, ctx, flow)
        elif isinstance(node, ast.Starred):
            self._target(node.value, ctx, flow)
        else:
            self._expr(node, ctx, flow)

    def _target_bases(self, node: ast.AST, ctx: _Ctx, flow: _Flow) -> None:
        """Load what a target reads without binding it (``a.b: int``, ``x.y += 1``)."""
        if isinstance(node, ast.Attribute):
            self._expr(node.value, ctx, flow)
        elif isinstance(node, ast.Subscript):
            self._expr(node.value, ctx, flow)
            self._expr(node.slice, ctx, flow)

    def _pattern(self, node: ast.pattern, ctx: _Ctx, flow: _Flow) -> None:
        if isinstance(node, ast.MatchValue):
            self._expr(node.value, ctx, flow)
            return
        if isinstance(node, ast.MatchClass):
            self._expr(node.cls, ctx, flow)
        elif isinstance(node, ast.MatchMapping):
            for key in node.keys:
                self._expr(key, ctx, flow)
            if node.rest:
                self._store(node.rest, ctx, flow)
        elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
            self._store(node.name, ctx, flow)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.pattern):
                self._pattern(child, ctx, flow)

    # Statements ---------------------------------------------------------------------

    def _stmts(self, body: list[ast.stmt], ctx: _Ctx, flow: _Flow) -> bool:
        """Visit a block in order, updating ``flow``; return whether its end is reachable."""
        reachable = True
        for stmt in body:
            reachable = self._stmt(stmt, ctx, flow) and reachable
        return reachable

    def _branch(self, body: list[ast.stmt], ctx: _Ctx, flow: _Flow) -> _Outcome:
        branch = set(flow)
        return branch, self._stmts(body, ctx.deeper(), branch)

    @staticmethod
    def _join(flow: _Flow, outcomes: list[_Outcome]) -> bool:
        """Set ``flow`` to what holds after every reachable outcome; return if any is."""
        live = [branch for branch, reachable in outcomes if reachable]
        if not live:
            return False
        joined = set.intersection(*live)
        flow.clear()
        flow.update(joined)
        return True

    def _stmt(self, node: ast.stmt, ctx: _Ctx, flow: _Flow) -> bool:
        handler: Callable[[ast.stmt, _Ctx, _Flow], bool] | None = getattr(
            self, "_stmt_" + type(node).__name__, None
        )
        if handler is not None:
            return handler(node, ctx, flow)
        for child in ast.iter_child_nodes(node):  # a statement of a newer Python
            if isinstance(child, ast.stmt):
                self._stmt(child, ctx.deeper(), set(flow))
            else:
                self._expr(child, ctx, flow)
        return True

    def _stmt_Expr(self, node: ast.Expr, ctx: _Ctx, flow: _Flow) -> bool:
        flow |= self._expr(node.value, ctx, flow)
        return True

    def _stmt_Assign(self, node: ast.Assign, ctx: _Ctx, flow: _Flow) -> bool:
        flow |= self._expr(node.value, ctx, flow)
        for target in node.targets:
            self._target(target, ctx, flow)
        return True

    def _stmt_AugAssign(self, node: ast.AugAssign, ctx: _Ctx, flow: _Flow) -> bool:
        if isinstance(node.target, ast.Name):
            self._load(node.target.id, ctx, flow)
        else:
            self._target_bases(node.target, ctx, flow)
        flow |= self._expr(node.value, ctx, flow)
        if isinstance(node.target, ast.Name):
            self._store(node.target.id, ctx, flow)
        return True

    def _stmt_AnnAssign(self, node: ast.AnnAssign, ctx: _Ctx, flow: _Flow) -> bool:
        self._expr(node.annotation, ctx, flow)
        if node.value is None:
            self._target_bases(node.target, ctx, flow)
            return True
        flow |= self._expr(node.value, ctx, flow)
        self._target(node.target, ctx, flow)
        return True

    def _stmt_Delete(self, node: ast.Delete, ctx: _Ctx, flow: _Flow) -> bool:
        for target in node.targets:
            self._expr(target, ctx, flow)  # Names in Del context delete; bases load
        return True

    def _stmt_Import(self, node: ast.Import, ctx: _Ctx, flow: _Flow) -> bool:
        for alias in node.names:
            self._store(_import_name(alias), ctx, flow)
        return True

    def _stmt_ImportFrom(self, node: ast.ImportFrom, ctx: _Ctx, flow: _Flow) -> bool:
        for alias in node.names:
            if alias.name == "*":
                self._star_import = True
            else:
                self._store(_import_name(alias), ctx, flow)
        return True

    def _stmt_FunctionDef(self, node: ast.FunctionDef, ctx: _Ctx, flow: _Flow) -> bool:
        acc: set[str] = set()
        for expr in [*node.decorator_list, *_defaults(node.args)]:
            acc |= self._expr(expr, ctx, flow)
        outer = self._type_params(node, ctx, flow)
        for annotation in _annotations(node.args, node.returns):
            acc |= self._expr(annotation, outer, flow)
        scope = _function_scope(node.args, list(node.body), outer.scope)
        self._stmts(node.body, self._nested_ctx(scope, outer, flow), set())
        flow |= acc
        self._store(node.name, ctx, flow)
        return True

    _stmt_AsyncFunctionDef = _stmt_FunctionDef

    def _stmt_ClassDef(self, node: ast.ClassDef, ctx: _Ctx, flow: _Flow) -> bool:
        acc: set[str] = set()
        for expr in node.decorator_list:
            acc |= self._expr(expr, ctx, flow)
        outer = self._type_params(node, ctx, flow)
        for base in [*node.bases, *node.keywords]:
            acc |= self._expr(base, outer, flow)
        bound, declared_global, declared_nonlocal = _collect(node.body)
        scope = _Scope(
            "class",
            outer.scope,
            frozenset(bound - declared_global - declared_nonlocal),
            frozenset(declared_global),
            frozenset(declared_nonlocal),
        )
        self._stmts(node.body, self._nested_ctx(scope, outer, flow), set())
        flow |= acc
        self._store(node.name, ctx, flow)
        return True

    def _type_params(self, node: ast.AST, ctx: _Ctx, flow: _Flow) -> _Ctx:
        """The scope of a generic's type parameters (Python 3.12+), or ``ctx``."""
        params = getattr(node, "type_params", None)
        if not params:
            return ctx
        scope = _Scope("function", ctx.scope, frozenset(p.name for p in params))
        inner = self._nested_ctx(scope, ctx, flow)
        for param in params:
            self._expr(param, inner, set())  # bounds and defaults
        return inner

    def _stmt_TypeAlias(self, node: ast.stmt, ctx: _Ctx, flow: _Flow) -> bool:
        inner = self._type_params(node, ctx, flow)
        value = node.value  # type: ignore[attr-defined]
        self._expr(value, self._nested_ctx(_Scope("function", inner.scope), inner, flow), set())
        self._target(node.name, ctx, flow)  # type: ignore[attr-defined]
        return True

    def _stmt_Return(self, node: ast.Return, ctx: _Ctx, flow: _Flow) -> bool:
        self._expr(node.value, ctx, flow)
        return False

    def _stmt_Raise(self, node: ast.Raise, ctx: _Ctx, flow: _Flow) -> bool:
        self._expr(node.exc, ctx, flow)
        self._expr(node.cause, ctx, flow)
        return False

    def _stmt_Break(self, node: ast.stmt, ctx: _Ctx, flow: _Flow) -> bool:
        return False

    _stmt_Continue = _stmt_Break

    def _stmt_Pass(self, node: ast.stmt, ctx: _Ctx, flow: _Flow) -> bool:
        return True

    _stmt_Global = _stmt_Nonlocal = _stmt_Pass  # collected with the scope

    def _stmt_Assert(self, node: ast.Assert, ctx: _Ctx, flow: _Flow) -> bool:
        flow |= self._expr(node.test, ctx, flow)
        self._visit([(node.msg, ctx, flow, None)] if node.msg else [])
        return True

    def _stmt_If(self, node: ast.If, ctx: _Ctx, flow: _Flow) -> bool:
        flow |= self._expr(node.test, ctx, flow)
        outcomes = [self._branch(node.body, ctx, flow), self._branch(node.orelse, ctx, flow)]
        return self._join(flow, outcomes)

    def _stmt_For(self, node: ast.For, ctx: _Ctx, flow: _Flow) -> bool:
        flow |= self._expr(node.iter, ctx, flow)
        inner = ctx.deeper()
        body = set(flow)
        self._target(node.target, inner, body)
        self._stmts(node.body, inner, body)
        self._branch(node.orelse, ctx, flow)
        return True  # the loop may run no iteration: ``flow`` stands

    _stmt_AsyncFor = _stmt_For

    def _stmt_While(self, node: ast.While, ctx: _Ctx, flow: _Flow) -> bool:
        flow |= self._expr(node.test, ctx, flow)
        self._branch(node.body, ctx, flow)
        self._branch(node.orelse, ctx, flow)
        return True

    def _stmt_With(self, node: ast.With, ctx: _Ctx, flow: _Flow) -> bool:
        for item in node.items:
            flow |= self._expr(item.context_expr, ctx, flow)
            if item.optional_vars is not None:
                self._target(item.optional_vars, ctx, flow)
        self._branch(node.body, ctx, flow)
        return True  # a context manager may swallow an exception of the body

    _stmt_AsyncWith = _stmt_With

    def _stmt_Try(self, node: ast.Try, ctx: _Ctx, flow: _Flow) -> bool:
        inner = ctx.deeper()
        body = set(flow)
        completes = self._stmts(node.body, inner, body)
        completes = self._stmts(node.orelse, inner, body) and completes
        outcomes = [(body, completes)]
        for handler in node.handlers:
            self._expr(handler.type, ctx, flow)
            branch = set(flow)
            if handler.name:
                self._store(handler.name, inner, branch)
            handled = self._stmts(handler.body, inner, branch)
            if handler.name:  # Python deletes the name when the handler ends
                self._delete(handler.name, inner, branch, implicit=True)
            outcomes.append((branch, handled))
        final = set(flow)
        final_reachable = self._stmts(node.finalbody, inner, final)
        reachable = self._join(flow, outcomes)
        if ctx.scope.kind == "module":
            flow |= final  # module flows only grow, so both hold after the finally
        else:
            flow.intersection_update(final)
        return reachable and final_reachable

    _stmt_TryStar = _stmt_Try

    def _stmt_Match(self, node: ast.stmt, ctx: _Ctx, flow: _Flow) -> bool:
        flow |= self._expr(node.subject, ctx, flow)  # type: ignore[attr-defined]
        inner = ctx.deeper()
        outcomes: list[_Outcome] = [(set(flow), True)]  # no case may match
        for case in node.cases:  # type: ignore[attr-defined]
            branch = set(flow)
            self._pattern(case.pattern, inner, branch)
            branch |= self._expr(case.guard, inner, branch)
            outcomes.append((branch, self._stmts(case.body, inner, branch)))
        return self._join(flow, outcomes)

    def _stmt__Isolated(self, node: _Isolated, ctx: _Ctx, flow: _Flow) -> bool:
        scope = _function_scope(ast.arguments([], [], None, [], [], None, []), node.body, ctx.scope)
        self._stmts(node.body, self._nested_ctx(scope, ctx, flow), set())
        return True
