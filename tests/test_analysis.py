"""Tests for link_kernel.sync.analysis: which names a cell reads, binds and deletes."""

from __future__ import annotations

import builtins
import textwrap
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from link_kernel.sync.analysis import Names, analyze

BUILTINS = frozenset(dir(builtins))


def case(code: str, reads: str = "", binds: str = "", deletes: str = "", *, id: str) -> Any:
    """One table row; names are space-separated, builtins are left out of ``reads``."""
    return pytest.param(
        textwrap.dedent(code).lstrip("\n"),
        frozenset(reads.split()),
        frozenset(binds.split()),
        frozenset(deletes.split()),
        id=id,
    )


CASES = [
    # Straight-line top level
    case("x = 1", "", "x", id="assign-constant"),
    case("x = x + 1", "x", "x", id="assign-reads-itself"),
    case("y = x * 2", "x", "y", id="assign-from-other"),
    case("v = 1\nprint(v)", "", "v", id="bound-before-use-is-not-read"),
    case("print(v)\nv = 1", "v", "v", id="use-before-bind-is-read"),
    case("a, (b, *c) = t", "t", "a b c", id="tuple-starred-targets"),
    case("[a, b] = 1, 2", "", "a b", id="list-target"),
    case("a = b = c", "c", "a b", id="chained-assign"),
    case("x: int = 3", "", "x", id="annotated-assign"),
    case("x: MyType", "MyType", "", id="annotation-without-value-binds-nothing"),
    case("x: MyType = y", "MyType y", "x", id="annotation-is-read"),
    case("x += 1", "x", "x", id="augassign-reads"),
    case("x = 0\nx += 1", "", "x", id="augassign-after-bind"),
    case("obj.attr = v", "obj v", "", id="attribute-store-reads-base"),
    case("obj.a.b = 1", "obj", "", id="nested-attribute-store"),
    case("d[k] = v", "d k v", "", id="subscript-store-reads-base-and-key"),
    case("d[k] += 1", "d k", "", id="subscript-augassign"),
    case("obj.n += 1", "obj", "", id="attribute-augassign"),
    case("df.dropna(inplace=True)", "df", "", id="method-call-reads"),
    case("x.y: int", "x", "", id="annotated-attribute-without-value"),
    case("f(a, *b, k=c, **d)", "f a b c d", "", id="call-arguments"),
    case("x = y if c else z", "y c z", "x", id="conditional-expression"),
    case("s = f'{name!r:>{width}}'", "name width", "s", id="fstring"),
    case("x = a[1:n]", "a n", "x", id="slice"),
    case("x = {k: v}", "k v", "x", id="dict-display"),
    case("await task", "task", "", id="top-level-await"),
    # Deletes
    case("del a", "a", "", "a", id="del-deletes-and-reads"),
    case("del a\na = 1", "a", "a", "", id="del-then-rebind"),
    case("a = 1\ndel a", "", "", "a", id="bind-then-del"),
    case("del a, b", "a b", "", "a b", id="del-several"),
    case("del (a, [b])", "a b", "", "a b", id="del-tuple"),
    case("del a\nif c:\n    a = 1", "a c", "a", "", id="del-then-maybe-rebind"),
    case("if c:\n    del a", "c a", "a", "", id="maybe-del-is-bind"),
    case("if c:\n    a = 1\ndel a", "c a", "", "a", id="maybe-bind-then-del"),
    case("del x.attr", "x", "", id="del-attribute-reads"),
    case("del x[i]", "x i", "", id="del-subscript-reads"),
    case(
        "def f():\n    global a\n    a = 1\ndel a\nf()",
        "a",
        "a f",
        "",
        id="del-but-function-may-rebind",
    ),
    # Control flow at top level
    case("if c:\n    v = 1\nprint(v)", "c v", "v", id="maybe-bound-is-read"),
    case("if c:\n    v = 1\nelse:\n    v = 2\nprint(v)", "c", "v", id="bound-on-both-arms"),
    case("if c:\n    v = 1\nelse:\n    raise E\nprint(v)", "c E", "v", id="raise-arm-ends-path"),
    case("if c:\n    v = 1\n    print(v)", "c", "v", id="bound-earlier-in-same-block"),
    case(
        "for i in range(n):\n    total += i",
        "n total",
        "i total",
        id="loop-accumulates",
    ),
    case(
        "for i in items:\n    last = i\nprint(last, i)",
        "items last i",
        "i last",
        id="loop-may-not-run",
    ),
    case("for k, v in d.items():\n    pass", "d", "k v", id="for-tuple-target"),
    case("for x.a in y:\n    pass", "x y", "", id="for-attribute-target"),
    case("while n > 0:\n    n -= 1", "n", "n", id="while"),
    case("while (line := f()):\n    print(line)\nprint(line)", "f", "line", id="while-walrus-test"),
    case("for i in r:\n    pass\nelse:\n    done = i", "r i", "i done", id="for-else"),
    case(
        "try:\n    import torch\nexcept ImportError:\n    torch = None",
        "",
        "torch",
        id="try-import-fallback",
    ),
    case(
        "try:\n    x = f()\nexcept Exception:\n    x = None\nprint(x)",
        "f",
        "x",
        id="try-bound-on-every-path",
    ),
    case(
        "try:\n    x = f()\nexcept Exception:\n    pass\nprint(x)", "f x", "x", id="try-maybe-bound"
    ),
    case(
        "try:\n    pass\nexcept ValueError as e:\n    msg = str(e)",
        "e",
        "msg e",
        id="except-as-may-delete",
    ),
    case(
        "try:\n    pass\nexcept E as e:\n    pass\ndel e", "E e", "", "e", id="except-as-then-del"
    ),
    case("e = 1\nif c:\n    del e", "c e", "e", id="bound-then-maybe-deleted-is-read"),
    case("e = 1\ndel e\nif c:\n    e = 2", "c e", "e", id="deleted-then-maybe-bound-is-read"),
    case(
        "a = 1\ndef f():\n    global a\n    del a", "a", "a f", id="global-del-after-bind-is-read"
    ),
    case("try:\n    pass\nfinally:\n    z = 1\nprint(z)", "", "z", id="finally-always-runs"),
    case("try:\n    y = 1\nfinally:\n    print(y)", "y", "y", id="finally-may-run-before-body"),
    case(
        "try:\n    y = 1\nexcept E:\n    pass\nelse:\n    print(y)",
        "E",
        "y",
        id="try-else-after-body",
    ),
    case("with open(p) as fh:\n    data = fh.read()", "p", "fh data", id="with-as"),
    case("with a as (x, y), b as z:\n    pass", "a b", "x y z", id="with-several-items"),
    case("with lock:\n    v = 1\nprint(v)", "lock v", "v", id="with-body-may-not-finish"),
    case("with cm() as fh:\n    pass\nprint(fh)", "cm", "fh", id="with-target-bound-after"),
    # Functions, lambdas, classes
    case("def f():\n    return y\nf()", "y", "f", id="function-body-reads-global"),
    case("def f(y):\n    return y", "", "f", id="parameter-is-local"),
    case("def f():\n    y = 1\n    return y", "", "f", id="local-is-not-read"),
    case("y = 1\ndef f():\n    return y", "", "y f", id="global-bound-before-def"),
    case("def f():\n    return y\ny = 1\nf()", "y", "f y", id="global-bound-after-def"),
    case("def f(a=k, *, b=m):\n    pass", "k m", "f", id="default-arguments"),
    case("def f(a: A, *r: R, **kw: K) -> T:\n    pass", "A R K T", "f", id="annotations"),
    case("@dec\ndef f():\n    pass", "dec", "f", id="decorator"),
    case("@dec(arg)\nclass C:\n    pass", "dec arg", "C", id="class-decorator"),
    case("async def f():\n    await g()", "g", "f", id="async-def"),
    case("def f():\n    global g\n    g = 1", "", "f g", id="global-assign-in-function"),
    case("def f():\n    global g\n    g += 1", "g", "f g", id="global-augassign-in-function"),
    case("def f():\n    global g\n    del g", "g", "f g", id="global-del-in-function"),
    case("def f():\n    global g\n    return g", "g", "f", id="global-load-in-function"),
    case(
        """
        def outer():
            x = 1
            def inner():
                nonlocal x
                x += 1
                return x + y
            return inner
        """,
        "y",
        "outer",
        id="nonlocal",
    ),
    case(
        "def outer():\n    x = 1\n    def inner():\n        return x\n    return inner",
        "",
        "outer",
        id="closure-is-not-read",
    ),
    case("def f():\n    print(x)\n    x = 1", "", "f", id="local-anywhere-in-function"),
    case("def f():\n    import os\n    return os", "", "f", id="import-inside-function-is-local"),
    case("def f():\n    for i in r:\n        pass", "r", "f", id="loop-in-function"),
    case("def f():\n    return [x for x in y]", "y", "f", id="comprehension-in-function"),
    case(
        "def f():\n    [(q := 1) for _ in r]\n    return q",
        "r",
        "f",
        id="walrus-in-comprehension-in-function",
    ),
    case(
        "def f():\n    try:\n        pass\n    except E as e:\n        return e",
        "E",
        "f",
        id="except-as-in-function",
    ),
    case("lambda a: a + b", "b", "", id="lambda"),
    case("g = lambda a, b=d: a + b + c", "d c", "g", id="lambda-default"),
    case("h = lambda: (w := 1)", "", "h", id="walrus-in-lambda-is-local"),
    case("class C:\n    attr = k", "k", "C", id="class-body-reads"),
    case("class C(Base, metaclass=M):\n    pass", "Base M", "C", id="class-bases"),
    case("class C:\n    a = 1\n    b = a + 1", "", "C", id="class-local"),
    case("class C:\n    b = a + 1\n    a = 1", "a", "C", id="class-local-bound-later"),
    case(
        "class C:\n    a = 1\n    def m(self):\n        return a",
        "a",
        "C",
        id="method-skips-class-scope",
    ),
    case(
        "class C:\n    xs = [1]\n    ys = [x for x in xs]",
        "",
        "C",
        id="class-comprehension-first-iter",
    ),
    case(
        "class C:\n    xs = [1]\n    ys = [x for _ in r for x in xs]",
        "r xs",
        "C",
        id="class-comprehension-inner",
    ),
    case("class C:\n    global g\n    g = 1", "", "C g", id="class-global"),
    case(
        "def f():\n    y = 1\n    class C:\n        z = y\n    return C",
        "",
        "f",
        id="class-in-function-closure",
    ),
    # Comprehensions and walrus
    case("[z for z in data]", "data", "", id="list-comprehension"),
    case("{k: v for k, v in d.items() if v > lim}", "d lim", "", id="dict-comprehension"),
    case("{y for x in xs for y in x}", "xs", "", id="nested-generators"),
    case("g = (x * s for x in xs)", "s xs", "g", id="generator-expression"),
    case("x = 1\n[x for x in y]\nprint(x)", "y", "x", id="comprehension-does-not-leak"),
    case("(w := 3)", "", "w", id="walrus"),
    case("(w := 3)\nprint(w)", "", "w", id="walrus-then-use"),
    case("if (m := f()):\n    print(m)", "f", "m", id="walrus-in-if-test"),
    case("x = a or (w := 1)\nprint(w)", "a w", "w x", id="walrus-in-short-circuit"),
    case("[(q := i) for i in r]", "r", "q", id="walrus-in-comprehension"),
    case("[(q := i) for i in r]\nprint(q)", "r q", "q", id="walrus-in-comprehension-may-not-run"),
    # Imports
    case("import numpy as np", "", "np", id="import-as"),
    case("import os.path", "", "os", id="import-dotted"),
    case("import os.path as osp, sys", "", "osp sys", id="import-several"),
    case("from collections import OrderedDict as OD, deque", "", "OD deque", id="from-import"),
    case("from . import sibling", "", "sibling", id="relative-import"),
    # Match
    case(
        """
        match cmd:
            case [action, *rest]:
                pass
            case {'k': val, **others}:
                pass
        """,
        "cmd",
        "action rest val others",
        id="match-captures",
    ),
    case(
        """
        match p:
            case Point(x=0, y=yy) if yy > lim:
                pass
            case Color.RED | None:
                pass
            case other:
                print(other)
        """,
        "p Point lim Color",
        "yy other",
        id="match-class-value-guard",
    ),
    case("match p:\n    case (1 as one):\n        pass", "p", "one", id="match-as"),
    case("match p:\n    case q:\n        v = 1\nprint(v)", "p v", "q v", id="match-body-maybe"),
    # IPython syntax
    case("%time y = g(x)", "g x", "y", id="line-magic-time"),
    case("%time y = 1\nprint(y)", "", "y", id="line-magic-time-binds-in-order"),
    case("%time --no-raise-error y = g(x)", "g x", "y", id="line-magic-time-flag"),
    case("%%time\ny = g(x)\nz = y", "g x", "y z", id="cell-magic-time"),
    case("%%time\n%time a = b", "b", "a", id="magic-inside-magic"),
    case("%timeit f(a)", "f a", "", id="line-magic-timeit"),
    case("%timeit -n 10 -r 2 x = f(a)", "f a", "", id="timeit-options-bind-nothing"),
    case("t = %timeit -o f(a)", "f a", "t", id="timeit-result"),
    case("%timeit -v res f(a)", "f a", "res", id="timeit-save-result"),
    case("%%timeit -n 3 s = setup(k)\ny = g(s)", "setup k g", "", id="cell-magic-timeit-setup"),
    case("%prun -s cumulative y = f(a)", "f a", "y", id="line-magic-prun"),
    case("%%prun -q\ny = f(a)", "f a", "y", id="cell-magic-prun"),
    case("%%capture out\nprint(zz)", "zz", "out", id="cell-magic-capture"),
    case("%%capture --no-stderr\nq = 1", "", "q", id="cell-magic-capture-no-output"),
    case("%%bash\necho $x\n", "", "", id="opaque-cell-magic"),
    case(
        "%%writefile out.py\nimport os\nx = os.getcwd()\n", "", "", id="writefile-body-is-not-code"
    ),
    case("files = !ls", "", "files", id="shell-assign"),
    case("!ls", "", "", id="shell-escape"),
    case("!echo {path} $stem", "path stem", "", id="shell-expansion"),
    case("files = !!ls {d + 1}", "d", "files", id="shell-output-expansion"),
    case("!awk '{print $1}' data.txt", "", "", id="shell-braces-not-python"),
    case("%cd {folder}", "folder", "", id="line-magic-expansion"),
    case("%matplotlib inline\nx = 1", "", "x", id="plain-line-magic"),
    case("df?", "df", "", id="help"),
    case("model.fit??", "model", "", id="help-detail"),
    case("if c:\n    %time y = 1\nprint(y)", "c y", "y", id="magic-in-block"),
    case("x = get_ipython()", "get_ipython", "x", id="explicit-get-ipython-is-read"),
    # Router lines and comments
    case("# link: gpu\nx = y", "y", "x", id="routing-comment"),
    case("%link status\nx = 1", "", "x", id="link-command-ignored"),
    case("%link default gpu\n%link release\ny = x", "x", "y", id="link-commands-ignored"),
    case("# link: gpu\n%%timeit\ny = f(x)", "f x", "", id="cell-magic-after-routing-comment"),
    case("# link: gpu keep\n%%bash\necho hi", "", "", id="shell-cell-after-routing-comment"),
    case("%%capture out\n%link status\nq = 1", "", "out q", id="link-command-in-magic-body"),
]


@pytest.mark.parametrize(("code", "reads", "binds", "deletes"), CASES)
def test_names(
    code: str, reads: frozenset[str], binds: frozenset[str], deletes: frozenset[str]
) -> None:
    names = analyze(code)
    assert (names.reads - BUILTINS, names.binds, names.deletes) == (reads, binds, deletes)
    assert not names.star_import
    assert names.placeholders <= names.reads


@pytest.mark.parametrize(
    ("code", "placeholders"),
    [
        pytest.param("del a", {"a"}, id="del-needs-only-the-name"),
        pytest.param("del a\nprint(a)", {"a"}, id="load-after-del-is-not-of-the-old-value"),
        pytest.param("print(a)\ndel a", set(), id="value-read-before-del"),
        pytest.param("x = a\nif c:\n    del a", set(), id="value-read-before-maybe-del"),
        pytest.param("a = 1\ndel a", set(), id="bound-then-deleted-needs-nothing"),
        pytest.param("a = 1\nif c:\n    del a", {"a"}, id="bound-then-maybe-deleted"),
        pytest.param("try:\n    pass\nexcept E as e:\n    pass", {"e"}, id="except-as"),
        pytest.param("def f():\n    global a\n    del a", {"a"}, id="global-del"),
        pytest.param("def f():\n    global a\n    a += 1\n    del a", set(), id="global-read-del"),
        pytest.param("class C:\n    x = 1\n    del x", set(), id="class-attribute-del"),
        pytest.param("del a.b, c[0]", set(), id="attribute-and-item-del"),
    ],
)
def test_placeholders(code: str, placeholders: set[str]) -> None:
    names = analyze(code)
    assert names.placeholders == placeholders
    assert names.placeholders <= names.reads


@pytest.mark.parametrize(
    ("code", "inplace"),
    [
        pytest.param("a *= 2", {"a"}, id="augmented"),
        pytest.param("for x in xs:\n    total += x", {"total"}, id="in-a-loop"),
        pytest.param("a = b\na *= 2", set(), id="bound-first-is-not-an-input"),
        pytest.param("def f():\n    global a\n    a += 1", set(), id="inside-a-function"),
        pytest.param("a[0] += 1\nb.x -= 1", set(), id="item-and-attribute"),
        pytest.param("c = a * 2", set(), id="read-only"),
    ],
)
def test_inplace(code: str, inplace: set[str]) -> None:
    names = analyze(code)
    assert names.inplace == inplace
    assert names.inplace <= names.reads


@pytest.mark.parametrize(
    ("code", "everything"),
    [
        pytest.param("%who", True, id="who"),
        pytest.param("%whos", True, id="whos"),
        pytest.param("names = %who_ls", True, id="who_ls"),
        pytest.param("'df' in dir()", True, id="dir"),
        pytest.param("sorted(globals())", True, id="globals"),
        pytest.param("def f():\n    return globals()['x']", True, id="globals-in-a-function"),
        pytest.param("for k in list(vars()):\n    pass", True, id="vars"),
        pytest.param("def f():\n    return dir()", False, id="dir-in-a-function"),
        pytest.param("dir(np)", False, id="dir-of-a-value"),
        pytest.param("vars(obj)", False, id="vars-of-a-value"),
        pytest.param("%timeit x + 1", False, id="other-magic"),
        pytest.param("class C:\n    names = locals()", False, id="locals-in-a-class"),
    ],
)
def test_a_cell_that_lists_the_namespace_reads_everything(code: str, everything: bool) -> None:
    assert analyze(code).everything is everything


def test_star_import() -> None:
    names = analyze("from numpy import *\nx = array(y)")
    assert names.star_import
    assert names.binds == {"x"}
    assert {"array", "y"} <= names.reads


def test_builtins_are_reported_for_the_caller_to_filter() -> None:
    assert analyze("print(len(x))").reads == {"print", "len", "x"}


def test_empty_cell() -> None:
    assert analyze("") == Names(frozenset(), frozenset(), frozenset())


@pytest.mark.parametrize("code", ["x = (", "def f(:\n    pass", "x = = 1", "  y = 1\n z = 2"])
def test_invalid_python_raises_syntax_error(code: str) -> None:
    with pytest.raises(SyntaxError):
        analyze(code)


def test_unparsable_magic_code_is_skipped() -> None:
    assert analyze("%time x = (\ny = 1").binds == {"y"}


def test_binds_and_deletes_are_disjoint() -> None:
    names = analyze("del a\nfor i in r:\n    a = i\ndel b\nb = 1\ndel c")
    assert names.binds == {"a", "i", "b"}
    assert names.deletes == {"c"}


def test_long_expression_needs_no_deep_recursion() -> None:
    code = "x = " + " + ".join(f"v{i}" for i in range(2000))
    assert len(analyze(code).reads) == 2000


def test_invalid_escape_warning_is_not_emitted(recwarn: pytest.WarningsRecorder) -> None:
    analyze("x = '\\d'")
    assert not [w for w in recwarn if issubclass(w.category, (SyntaxWarning, DeprecationWarning))]


# -- Properties --------------------------------------------------------------------------
#
# Small programs over a few variables, run twice: once in a namespace that holds every
# variable, once (as the remote cell would be) in a namespace that holds only the reads.
# The second run must not fail, and bringing back binds and applying deletes as the
# caller does must give the first run's namespace.

VARIABLES = ("a", "b", "c", "d")
FUNCTIONS = ("f", "g")

variables = st.sampled_from(VARIABLES)


def expressions(*, class_body: bool = False) -> st.SearchStrategy[str]:
    leaves = variables | st.integers(0, 3).map(str)
    # A class body's comprehensions may not bind with :=.

    def extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        two = st.tuples(inner, inner)
        walrus = [
            st.tuples(variables, inner).map(lambda p: f"({p[0]} := {p[1]})"),
            variables.map(lambda v: f"sum([({v} := x) for x in range(3)])"),
        ]
        return st.one_of(
            *([] if class_body else walrus),  # a class body's comprehensions may not bind
            two.map(lambda p: f"({p[0]} + {p[1]})"),
            inner.map(lambda e: f"sum([x + {e} for x in range(2)])"),
            two.map(lambda p: f"(lambda p: p + {p[0]})({p[1]})"),
            st.tuples(inner, inner, inner).map(lambda p: f"({p[0]} if {p[1]} > 2 else {p[2]})"),
            two.map(lambda p: f"({p[0]} and {p[1]})"),
            two.map(lambda p: f"({p[0]} or {p[1]})"),
            st.sampled_from(FUNCTIONS).map(lambda f: f"{f}()"),
            variables.map(lambda v: f'len(f"{{{v}}}")'),
        )

    return st.recursive(leaves, extend, max_leaves=4)


EXPRESSIONS = expressions()
CLASS_EXPRESSIONS = expressions(class_body=True)


@st.composite
def blocks(draw: st.DrawFn, depth: int = 0) -> list[str]:
    count = draw(st.integers(1, 5 if depth == 0 else 3))
    return [line for _ in range(count) for line in draw(statements(depth))]


def indent(lines: list[str]) -> list[str]:
    return ["    " + line for line in lines]


@st.composite
def statements(draw: st.DrawFn, depth: int = 0) -> list[str]:
    e = EXPRESSIONS
    simple = [
        st.tuples(variables, e).map(lambda p: [f"{p[0]} = {p[1]}"]),
        st.tuples(variables, e).map(lambda p: [f"{p[0]} += {p[1]}"]),
        st.tuples(variables, variables, e, e).map(lambda p: [f"{p[0]}, {p[1]} = {p[2]}, {p[3]}"]),
        variables.map(lambda v: [f"del {v}"]),
        st.tuples(variables, e).map(lambda p: [f"{p[0]} = 1 // ({p[1]} % 2)"]),
        st.sampled_from(FUNCTIONS).map(lambda f: [f"{f}()"]),
        e.map(lambda x: [x]),
        st.tuples(st.sampled_from(FUNCTIONS), variables, e, st.booleans()).map(
            lambda p: [
                f"def {p[0]}():",
                *indent(
                    [*([f"global {p[1]}"] if p[3] else []), f"{p[1]} = {p[2]}", f"return {p[1]}"]
                ),
            ]
        ),
    ]
    if depth >= 2:
        return draw(st.one_of(simple))
    body = blocks(depth + 1)
    compound = [
        st.tuples(e, body, body).map(
            lambda p: [f"if {p[0]} > 2:", *indent(p[1]), "else:", *indent(p[2])]
        ),
        st.tuples(variables, variables, body).map(
            lambda p: [f"for {p[0]} in range({p[1]} % 3):", *indent(p[2])]  # may not run
        ),
        st.tuples(body, body, st.booleans(), st.sampled_from(("err", *VARIABLES))).map(
            lambda p: (
                ["try:", *indent(p[0]), f"except ZeroDivisionError as {p[3]}:", *indent(p[1])]
                + (["finally:", *indent(["pass"])] if p[2] else [])
            )
        ),
        st.tuples(e, variables, body).map(
            lambda p: [
                f"with __import__('contextlib').nullcontext({p[0]}) as {p[1]}:",
                *indent(p[2]),
            ]
        ),
        st.tuples(e, body, variables, body).map(
            lambda p: [
                f"match {p[0]}:",
                "    case 1 | 2:",
                *indent(indent(p[1])),
                f"    case {p[2]}:",
                *indent(indent(p[3])),
            ]
        ),
        st.tuples(variables, CLASS_EXPRESSIONS, variables).map(
            lambda p: ["class K:", f"    {p[0]} = {p[1]}", f"    {p[2]} = {p[0]} + 1"]
        ),
    ]
    return draw(st.one_of(*simple, *compound))


def normal(namespace: dict[str, Any]) -> dict[str, Any]:
    """Comparable contents of a namespace: functions and classes by name."""
    return {
        k: (type(v).__name__, v.__name__) if callable(v) else v
        for k, v in namespace.items()
        if k != "__builtins__"
    }


class Placeholder:
    """Stands for a value the cell must not use; arithmetic on it raises TypeError."""


def run(code: str, namespace: dict[str, Any]) -> dict[str, Any]:
    namespace = {"__builtins__": builtins, **namespace}
    exec(compile(code, "<cell>", "exec"), namespace)  # the property under test
    return namespace


def one() -> int:
    return 1


@st.composite
def namespaces(draw: st.DrawFn) -> dict[str, Any]:
    """A local namespace: most variables and functions exist, with small values."""
    missing = draw(st.sets(st.sampled_from(VARIABLES + FUNCTIONS), max_size=1))
    values = {v: draw(st.integers(0, 3)) for v in VARIABLES}
    return {k: v for k, v in {**values, "f": one, "g": one}.items() if k not in missing}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(code=blocks().map(lambda lines: "\n".join(lines) + "\n"), local=namespaces())
def test_remote_run_with_reads_matches_local_run(code: str, local: dict[str, Any]) -> None:
    names = analyze(code)
    try:
        expected = run(code, local)
    except Exception:  # the program itself fails: nothing to compare
        return
    # Sent as the caller sends them: values of reads, stand-ins for placeholders.
    stand_in = Placeholder()
    sent = {
        k: stand_in if k in names.placeholders else v for k, v in local.items() if k in names.reads
    }
    remote = run(code, sent)  # must not raise: no read is missing, no stand-in is used
    merged = dict(local)
    for name in names.deletes:
        merged.pop(name, None)
    for name in names.binds:
        if name in remote and remote[name] is not stand_in:
            merged[name] = remote[name]
        elif name in sent and name not in remote:
            merged.pop(name, None)
    assert normal(merged) == normal(expected), code
    assert not names.binds & names.deletes


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab=+()[]:%!?$ {}\n\t#'\"-1xdefilorsnwy*@."))))
def test_never_fails_but_with_syntax_error(code: str) -> None:
    try:
        names = analyze(code)
    except SyntaxError:
        return
    assert isinstance(names, Names)
    assert not names.binds & names.deletes
