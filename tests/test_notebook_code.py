"""Notebook functions and classes travel with the notebook names and modules they use,
wherever they sit in a value; library classes and functions travel by reference."""

from __future__ import annotations

import pickle
import re

import pytest

#: Notebook code of every kind a value can reach, none of it named by the cells below.
NOTEBOOK = (
    "import functools, math\n"
    "import numpy as np\n"
    "from dataclasses import dataclass\n"
    "SCALE = 10\n"
    "OFFSET = np.float64(0.5)\n"
    "def helper(x):\n"
    "    return math.floor(x) * SCALE\n"
    "def logged(fn):\n"
    "    @functools.wraps(fn)\n"
    "    def wrapper(*args, **kwargs):\n"
    "        return ('logged', fn(*args, **kwargs))\n"
    "    return wrapper\n"
    "class Base:\n"
    "    def base_total(self):\n"
    "        return int(np.arange(4).sum()) + SCALE\n"
    "class M(Base):\n"
    "    def f(self):\n"
    "        return int(np.arange(3).sum())\n"
    "    @property\n"
    "    def prop(self):\n"
    "        return helper(2.7)\n"
    "    @classmethod\n"
    "    def made(cls):\n"
    "        return cls.__name__ + str(SCALE)\n"
    "    @staticmethod\n"
    "    def static():\n"
    "        return math.pi > 3\n"
    "    @logged\n"
    "    def decorated(self):\n"
    "        return float(OFFSET)\n"
    "    def nested(self):\n"
    "        def inner():\n"
    "            return [helper(v) for v in (1.5, 2.5)]\n"
    "        return inner()\n"
    "def with_default(x, fn=helper):\n"
    "    return fn(x)\n"
    "def make_adder():\n"
    "    step = SCALE\n"
    "    def add(x):\n"
    "        return x + step + int(OFFSET * 2)\n"
    "    return add\n"
    "@dataclass\n"
    "class Config:\n"
    "    lr: float = 0.1\n"
    "    def scaled(self):\n"
    "        return self.lr * SCALE\n"
    "m = M()\n"
    "callbacks = [lambda: helper(1.2), with_default]\n"
    "table = {'inc': make_adder(), 'sq': lambda v: np.square(v).item()}\n"
    "part = functools.partial(with_default, 3.3)\n"
    "cfg = Config(lr=0.25)\n"
)

#: What each expression gives in a plain kernel after NOTEBOOK.
EXPECTED = [
    ("m.f()", 3),
    ("m.base_total()", 16),
    ("m.prop", 20),
    ("m.made()", "M10"),
    ("m.static()", True),
    ("m.decorated()", ("logged", 0.5)),
    ("m.nested()", [10, 20]),
    ("[cb() for cb in callbacks[:1]] + [callbacks[1](4.9)]", [10, 40]),
    ("table['inc'](1)", 12),
    ("table['sq'](3)", 9),
    ("part()", 30),
    ("cfg.scaled()", 2.5),
]


@pytest.fixture(scope="module")
def notebook(link_remote):
    result = link_remote.run(NOTEBOOK)
    assert result.status == "ok", result.text
    return link_remote


@pytest.mark.parametrize(("expression", "expected"), EXPECTED, ids=[e for e, _ in EXPECTED])
def test_notebook_code_reached_through_a_value_brings_its_globals(notebook, remote, expression, expected):
    result = notebook.run(f"# link: {remote}\nvalue = {expression}\nvalue")
    assert result.status == "ok", result.text
    assert eval(result.result) == expected
    assert eval(notebook.run("value").result) == expected


def test_a_fitted_pipeline_with_a_notebook_function(notebook, remote):
    setup = notebook.run(
        "from sklearn.pipeline import make_pipeline\n"
        "from sklearn.preprocessing import FunctionTransformer\n"
        "from sklearn.linear_model import LinearRegression\n"
        "POWER = 2\n"
        "def featurize(x):\n"
        "    return np.hstack([x, np.power(x, POWER)])\n"
        "xs = np.arange(8.0).reshape(-1, 1)\n"
        "pipe = make_pipeline(FunctionTransformer(featurize), LinearRegression())\n"
        "pipe.fit(xs, 3 * xs[:, 0] ** 2 + 1)\n"
    )
    assert setup.status == "ok", setup.text
    # the cell names neither featurize nor POWER: the pipeline reaches them
    result = notebook.run(f"# link: {remote}\npredicted = pipe.predict(np.array([[10.0]])).round(6).tolist()")
    assert result.status == "ok", result.text
    assert notebook.run("predicted").result == "[301.0]"


def test_a_class_made_in_a_remote_cell_works_locally_with_its_globals(notebook, remote):
    result = notebook.run(
        f"# link: {remote} out=models\n"
        "import statistics\n"
        "FACTOR = 3\n"
        "def triple(v):\n"
        "    return v * FACTOR\n"
        "class Remote:\n"
        "    def __init__(self, data):\n"
        "        self.data = data\n"
        "    def score(self):\n"
        "        return statistics.mean(triple(v) for v in self.data)\n"
        "models = [Remote([1, 2, 3])]\n"
    )
    assert result.status == "ok", result.text
    assert notebook.run("models[0].score()").result == "6"
    assert notebook.run("(type(models[0]).__name__, FACTOR)").result == "('Remote', 3)"


def test_a_name_only_an_attribute_shares_is_not_sent(notebook, remote):
    """``self.data`` in a method does not send the notebook's global ``data``."""
    notebook.run(
        "data = np.ones(2**20)\n"
        "class Holder:\n"
        "    def __init__(self):\n"
        "        self.data = [1, 2]\n"
        "    def total(self):\n"
        "        return sum(self.data)\n"
        "holder = Holder()\n"
    )
    result = notebook.run(f"# link: {remote}\nholder.total()")
    assert result.result == "3"
    assert result.reply["metadata"]["link"]["sent"] < 2**16


def test_library_classes_travel_by_reference():
    """dill pickles a class by value when its package deleted the submodule's name
    (``torch.optim`` deletes ``sgd``); Link's pickler refers to it by name."""
    import torch

    from link_kernel import agent

    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pickled, buffers = agent.dumps(optimizer)
    assert b"typing_extensions" not in pickled
    back = pickle.loads(pickled, buffers=buffers)
    assert type(back) is torch.optim.SGD


#: A training cell as a PyTorch tutorial writes it, and what must come back of it.
TRAINING = (
    "import torch\n"
    "from torch.utils.data import DataLoader, TensorDataset\n"
    "torch.manual_seed(0)\n"
    "xs = torch.linspace(-1, 1, 64).unsqueeze(1)\n"
    "loader = DataLoader(TensorDataset(xs, 3 * xs + 1), batch_size=16, shuffle=False)\n"
    "model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))\n"
    "optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)\n"
    "scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)\n"
    "loss_fn = torch.nn.MSELoss()\n"
    "for epoch in range(10):\n"
    "    for xb, yb in loader:\n"
    "        optimizer.zero_grad()\n"
    "        loss = loss_fn(model(xb), yb)\n"
    "        loss.backward()\n"
    "        optimizer.step()\n"
    "    scheduler.step()\n"
    "w = torch.ones(3, requires_grad=True)\n"
    "(w * 2).sum().backward()\n"
    "gen = torch.Generator().manual_seed(7)\n"
)

CHECK = (
    "(type(optimizer).__name__, isinstance(optimizer, torch.optim.SGD), round(optimizer.param_groups[0]['lr'], 4),"
    " type(scheduler).__name__, scheduler.last_epoch, loss.requires_grad, w.grad.tolist(), w.requires_grad,"
    " torch.randint(0, 10**6, (1,), generator=gen).item(), len(loader), bool(loss.item() < 1.0))"
)


def test_torch_training_objects_come_back(link_remote, remote):
    plain = link_remote.run(TRAINING + "print(" + CHECK + ")")  # the local kernel is the plain one
    assert plain.status == "ok", plain.text
    expected = eval(plain.stdout)
    result = link_remote.run(f"# link: {remote}\n{TRAINING}")
    assert result.status == "ok", result.text
    assert result.stderr == "", result.stderr
    assert eval(link_remote.run(CHECK).result) == expected
    # the optimizer that came back still works on what it optimizes
    step = link_remote.run("optimizer.zero_grad(); loss_fn(model(xs), 3 * xs + 1).backward(); optimizer.step(); 'ok'")
    assert step.result == "'ok'", step.text


def test_a_name_reached_dynamically_says_how_to_send_it(link_remote, remote):
    link_remote.run("df1 = [1, 2]\ndef size_of(name):\n    return len(eval(name))")
    result = link_remote.run(f"# link: {remote}\nsize_of('df1')")
    assert result.status == "error"
    error = result.error
    assert error["ename"] == "NameError" == result.content["ename"]
    assert error["evalue"] == result.content["evalue"] == (
        f"name 'df1' is not defined on {remote}; it exists in the local kernel, but the cell "
        "does not name it directly, so Link did not send it: add in=size_of,df1 to the routing comment"
    )
    traceback = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(error["traceback"]))
    assert "size_of('df1')" in traceback and "in size_of" in traceback
    assert "link_kernel" not in traceback and "__link_agent__" not in traceback
    assert link_remote.run(f"# link: {remote} in=size_of,df1\nsize_of('df1')").result == "2"
    nowhere = link_remote.run(f"# link: {remote}\nsize_of('nowhere')")
    assert nowhere.error["evalue"] == "name 'nowhere' is not defined"


#: Notebook types as tutorials write them: an Enum with methods and a hook, a dataclass
#: that holds one, a plain class, and a function a partial holds.
TYPES = (
    "import enum, functools\n"
    "from dataclasses import dataclass, field\n"
    "class Color(enum.Enum):\n"
    "    RED = 1\n"
    "    GREEN = 2\n"
    "    CRIMSON = 1\n"
    "    def label(self):\n"
    "        return self.name.lower()\n"
    "    @classmethod\n"
    "    def _missing_(cls, value):\n"
    "        return cls.GREEN if value == 'g' else None\n"
    "class Level(enum.IntFlag):\n"
    "    READ = enum.auto()\n"
    "    WRITE = enum.auto()\n"
    "@dataclass\n"
    "class Item:\n"
    "    name: str\n"
    "    color: Color = Color.RED\n"
    "    tags: list = field(default_factory=list)\n"
    "class Plain:\n"
    "    def __init__(self, v):\n"
    "        self.v = v\n"
    "    @functools.cached_property\n"
    "    def double(self):\n"
    "        return self.v * 2\n"
    "def scale(x, by=2):\n"
    "    return x * by\n"
    "kept, original = Item('kept'), (Item, Plain, Color)\n"
)


def test_notebook_classes_and_functions_keep_their_identity(link_remote, remote):
    """What a remote cell makes of the notebook's types is of those types locally, and
    one definition is one class on the host too; a class the cell redefines is new."""
    assert link_remote.run(TYPES).status == "ok"
    made = link_remote.run(
        f"# link: {remote}\n"
        "items = [Item('a'), Item('b', Color('g'), ['x'])]\n"
        "plain, twice = Plain(1), functools.partial(scale, by=3)\n"
        "access = Level.READ | Level.WRITE\n"
        "(items[1].color.label(), Color.CRIMSON is Color.RED, isinstance(plain, Plain), plain.double)"
    )
    assert made.status == "ok", made.text
    assert made.result == "('green', True, True, 2)"
    assert made.stderr == "", made.stderr
    check = (
        "(isinstance(items[0], Item), items[0].color is Color.RED, items[1].color is Color.GREEN,"
        " type(plain) is Plain, twice.func is scale, twice(2), Level.WRITE in access,"
        " (Item, Plain, Color) == original, type(kept) is type(items[0]), vars(plain))"
    )
    expected = "(True, True, True, True, True, 6, True, True, True, {'v': 1, 'double': 2})"
    assert link_remote.run(check).result == expected
    assert link_remote.run(f"# link: {remote}\n{check}").result == expected
    redefined = link_remote.run(
        f"# link: {remote}\nold = plain\nclass Plain:\n    pass\n(isinstance(old, Plain), type(old).__name__)"
    )
    assert redefined.result == "(False, 'Plain')", redefined.text
    assert link_remote.run("(isinstance(old, Plain), isinstance(plain, Plain))").result == "(False, False)"


def test_code_that_pickles_by_reference_finds_the_notebooks_classes(link_remote, remote):
    """pickle and joblib refer to a notebook class by its name in ``__main__``: the
    host has it there, and Link's dill leaves pickle's own table as it was."""
    setup = link_remote.run(
        "import pickle, types, joblib\n"
        "class Thing:\n"
        "    def __init__(self):\n"
        "        self.v = [1, 2]\n"
        "thing = Thing()\n"
        "joblib.dump(thing, 'here.joblib')\n"
        "pickle._Pickler.dispatch[types.FunctionType].__module__"
    )
    assert setup.result == "'pickle'", setup.text
    result = link_remote.run(
        f"# link: {remote}\n"
        "import joblib, pickle\n"
        "joblib.dump({'thing': thing}, 'there.joblib')\n"
        "len(pickle.dumps(thing)) > 0"
    )
    assert result.result == "True", result.text
    loaded = link_remote.run("back = joblib.load('there.joblib')['thing']\n(type(back) is Thing, back.v)")
    assert loaded.result == "(True, [1, 2])", loaded.text
    # a notebook that imports dill itself gets what dill's import does
    table = "pickle._Pickler.dispatch[types.FunctionType].__module__"
    assert link_remote.run(f"import dill\n{table}").result == "'pickle'"
    assert link_remote.run(table).result == "'dill._dill'"
    link_remote.run("dill.extend(False)\ndel dill")


def test_a_cell_that_lists_the_namespace_sees_all_of_it(link_remote, remote):
    link_remote.run("alpha, beta = 1, [2]\ncounter = (n for n in range(3))\ndef helper():\n    return 1")
    local = link_remote.run("%who_ls")
    there = link_remote.run(f"# link: {remote}\n%who_ls")
    assert there.status == "ok", there.text
    names = eval(there.result)
    assert {"alpha", "beta", "helper"} <= set(names)
    # everything but what cannot leave the local kernel (the generator), not an error
    assert names == [n for n in eval(local.result) if n != "counter"]
    assert link_remote.run(f"# link: {remote}\n'beta' in dir() and 'alpha' in globals()").result == "True"


def test_in_memory_files_travel_with_their_content(link_remote, remote):
    result = link_remote.run(
        f"# link: {remote}\n"
        "%%capture captured\n"
        "print('captured text')"
    )
    assert result.status == "ok" and result.stderr == "", result.text
    assert link_remote.run("captured.stdout").result == "'captured text\\n'"
    moved = link_remote.run(f"# link: {remote}\nimport io\nbuf = io.BytesIO(b'abc')\nbuf.seek(1)")
    assert moved.status == "ok", moved.text
    assert link_remote.run("(buf.read(), buf.getvalue())").result == "(b'bc', b'abc')"


def test_a_scheduler_made_before_a_remote_cell_steps_as_locally(link_remote, remote):
    """A scheduler wraps its optimizer's step; after the trip the wrapper is there again,
    so the first ``scheduler.step()`` does not warn that it was overridden."""
    link_remote.run(
        "import torch\n"
        "net = torch.nn.Linear(2, 1)\n"
        "opt = torch.optim.Adam(net.parameters(), lr=0.1)\n"
        "sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)"
    )
    step = (
        "opt.zero_grad()\n"
        "net(torch.ones(1, 2)).sum().backward()\n"
        "opt.step()\n"
        "sched.step()\n"
        "sched.get_last_lr()"
    )
    result = link_remote.run(f"# link: {remote}\n{step}")
    assert result.status == "ok", result.text
    assert result.stderr == "", result.stderr
    assert result.result == "[0.05]"
    again = link_remote.run(step)
    assert again.stderr == "" and again.result == "[0.025]", again.text


def test_what_a_remote_cell_cannot_see_is_named_in_it(link_remote, remote):
    """The local output history and a function's cache stay in the local kernel; a
    remote cell that reads them says so."""
    link_remote.run(
        "import functools\n"
        "@functools.lru_cache(maxsize=None)\n"
        "def fib(n):\n"
        "    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
        "fib(20)"
    )
    cached = link_remote.run(f"# link: {remote}\nfib(10)")
    assert cached.result == "55", cached.text
    assert "fib: its cache (21 results) stays in the local kernel" in cached.stderr
    link_remote.run("fib.cache_clear()")
    assert "cache" not in link_remote.run(f"# link: {remote}\nfib(3)").stderr
    link_remote.run("41 + 1")
    history = link_remote.run(f"# link: {remote}\nprevious = _")
    assert f"_: IPython's output history is the local kernel's; a cell on {remote}" in history.stderr
    assert "output history" not in link_remote.run(f"# link: {remote}\nfor _ in range(2):\n    pass").stderr
