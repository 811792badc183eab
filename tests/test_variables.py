"""Variables travel between the local kernel and remote cells, on process and ssh hosts."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

DIGEST = (
    "__import__('hashlib').sha256(repr(sorted((k, id(v), repr(v)) for k, v in globals().items() "
    "if not k.startswith('_') and k not in ('In', 'Out', 'exit', 'quit', 'get_ipython', 'open')"
    ")).encode()).hexdigest()"
)


def digest(client) -> str:
    return client.run(DIGEST).result


def test_a_realistic_flow(link_remote, remote):
    setup = link_remote.run(
        "import numpy as np, pandas as pd\n"
        "rng = np.random.default_rng(0)\n"
        "X = rng.normal(size=(200, 3))\n"
        "df = pd.DataFrame(X, columns=['a', 'b', 'c'])\n"
        "df['y'] = 2 * df.a - df.b + 0.5\n"
        "def features(frame):\n"
        "    return frame[COLUMNS].to_numpy()\n"
        "COLUMNS = ['a', 'b']\n"
        "class LinearModel:\n"
        "    def __init__(self):\n"
        "        self.coef = None\n"
        "    def fit(self, x, y):\n"
        "        design = np.column_stack([x, np.ones(len(x))])\n"
        "        self.coef, *_ = np.linalg.lstsq(design, y, rcond=None)\n"
        "        return self\n"
        "    def predict(self, x):\n"
        "        return np.column_stack([x, np.ones(len(x))]) @ self.coef\n"
        "model = LinearModel()\n"
    )
    assert setup.status == "ok"
    remote_cell = link_remote.run(
        f"# link: {remote}\n"
        "model.fit(features(df), df.y)\n"
        "predictions = model.predict(features(df))\n"
        "error = float(np.abs(predictions - df.y).max())\n"
        "print(f'max error {error:.2e}')"
    )
    assert remote_cell.status == "ok", remote_cell.text
    assert remote_cell.stdout.startswith("max error")
    back = link_remote.run("(model.coef.round(6).tolist(), error < 1e-9, predictions.shape, type(model).__name__)")
    assert eval(back.result) == ([2.0, -1.0, 0.5], True, (200,), "LinearModel")
    assert link_remote.run("model.predict(np.array([[1.0, 1.0]]))[0].round(6)").result == "np.float64(1.5)"


def test_in_place_mutation_comes_back(link_remote, remote):
    link_remote.run("import numpy as np\nbuf = np.zeros(4)\nitems = [1]\nunchanged = {'k': 1}")
    result = link_remote.run(f"# link: {remote}\nbuf[2] = 7\nitems.append(2)\nsum(unchanged.values())")
    assert result.result == "1"
    assert link_remote.run("(buf.tolist(), items, unchanged)").result == "([0.0, 0.0, 7.0, 0.0], [1, 2], {'k': 1})"


def test_del_propagates(link_remote, remote):
    link_remote.run("doomed = 1\nkept = 2")
    assert link_remote.run(f"# link: {remote}\ndel doomed").status == "ok"
    assert link_remote.run("('doomed' in globals(), kept)").result == "(False, 2)"


@pytest.mark.parametrize(
    ("setup", "name", "type_name", "reason"),
    [
        ("import threading\nthing = threading.Lock()", "thing", "_thread.lock", "a lock belongs to the process"),
        ("thing = open(__import__('os').devnull)", "thing", "_io.TextIOWrapper", "belongs to the process"),
        ("thing = (i for i in range(3))", "thing", "generator", "a generator's position cannot be sent"),
    ],
)
def test_unserializable_inputs_are_refused_before_the_cell_runs(link_remote, remote, setup, name, type_name, reason):
    link_remote.run(setup + "\nsentinel = 'before'")
    before = digest(link_remote)
    result = link_remote.run(f"# link: {remote}\nsentinel = 'ran'\nprint({name})")
    assert result.status == "error"
    assert [m["msg_type"] for m in result.outputs] == ["error"]
    error = result.error
    assert error["ename"] == "SerializationError"
    assert f"variable {name!r} ({type_name}) cannot be sent" in error["evalue"]
    assert reason in error["evalue"]
    assert "in=" in "".join(error["traceback"])
    assert digest(link_remote) == before
    assert link_remote.run("sentinel").result == "'before'"


def test_a_name_a_host_kept_says_why_when_a_later_cell_needs_it(link_remote, remote):
    """A generator made remotely stays on the host; the NameError of the cells that use it
    next, here or there, says where it was made and why it is not here."""
    made = link_remote.run(f"# link: {remote}\nsquares = (i * i for i in range(5))\nnext(squares)")
    assert made.result == "0" and "squares (generator)" in made.stderr, made.text
    for where in ("", f"# link: {remote}\n"):
        used = link_remote.run(f"{where}next(squares)")
        assert used.error["ename"] == "NameError", used.text
        assert used.stderr.endswith(
            f"[link] squares was bound by a cell on {remote} and stayed there: "
            "generator: a generator's position cannot be sent; turn it into a list first\n"
        ), used.stderr
    assert link_remote.run(f"# link: {remote}\nsquares = list(range(3))").status == "ok"
    other = link_remote.run("del squares\nsquares")  # brought back since: nothing to say
    assert other.error["ename"] == "NameError" and "[link]" not in other.stderr, other.text
    assert "[link]" not in link_remote.run("undefined_thing").stderr


def test_a_closed_file_comes_back_closed_with_its_name_and_mode(link_remote, remote):
    """``with open(...) as f`` leaves ``f`` bound to a closed file, as in plain Python."""
    result = link_remote.run(
        f"# link: {remote}\nwith open('closed_file.txt', 'a', encoding='latin-1') as log:\n"
        "    log.write('x')\nwith open('closed_file.txt', 'rb') as raw:\n    raw.read()"
    )
    assert result.status == "ok", result.text
    assert result.stderr == "", result.stderr
    assert link_remote.run("print(log, log.closed, raw, raw.mode)").stdout == (
        "<_io.TextIOWrapper name='closed_file.txt' mode='a' encoding='latin-1'> True "
        "<_io.BufferedReader name='closed_file.txt'> rb\n"
    )
    sent = link_remote.run(f"# link: {remote}\nprint(repr(log), log.closed)")
    assert sent.stdout == "<_io.TextIOWrapper name='closed_file.txt' mode='a' encoding='latin-1'> True\n", sent.text


def test_a_widget_is_an_input_and_changes_in_place(link_remote, remote):
    """A remote cell reads and moves the local slider; its observer runs once, there,
    and the frontend hears the new value from the local kernel."""
    link_remote.run(
        "import ipywidgets as widgets\nslider = widgets.IntSlider(value=3, max=10)\nmoves = []\n"
        "def moved(change):\n    moves.append((change['old'], change['new']))\n"
        "slider.observe(moved, names='value')\nmodel = slider.model_id"
    )
    read = link_remote.run(f"# link: {remote}\nn = slider.value * 2\nn")
    assert read.result == "6", read.text
    assert read.stderr == "", read.stderr
    link_remote.run(  # what the local kernel tells the frontend about the slider
        "told = []\nsend = slider.comm.send\n"
        "slider.comm.send = lambda data=None, **kw: (told.append(data), send(data, **kw))"
    )
    moving = link_remote.run(f"# link: {remote}\nslider.value = 7\nslider.value = 5\nmoves")
    assert moving.result == "[(3, 7), (7, 5)]", moving.text
    assert link_remote.run("[m['state'] for m in told if m.get('method') == 'update']").result == "[{'value': 5}]"
    assert link_remote.run("slider.value, moves, slider.model_id == model").result == "(5, [(3, 7), (7, 5)], True)"
    slider_moves = link_remote.run("slider.value = 6\nmoves[-1]")  # the observer still runs here
    assert slider_moves.result == "(5, 6)"
    shown = link_remote.run(f"# link: {remote}\nslider")  # a view of the live local widget
    view = shown.of_type("execute_result")[0]["content"]["data"]
    assert view["application/vnd.jupyter.widget-view+json"]["model_id"] == link_remote.run("model").result[1:-1]
    assert view["text/plain"] == "IntSlider(value=6, max=10)"
    assert "no longer connected" not in shown.stderr


def test_a_widget_a_remote_cell_made_is_live_locally(link_remote, remote):
    made = link_remote.run(
        f"# link: {remote}\nimport ipywidgets as widgets\n"
        "choice = widgets.Dropdown(options=['mean', 'max'], value='max', description='stat')"
    )
    assert made.status == "ok", made.text
    assert "not brought back" not in made.stderr, made.stderr
    assert link_remote.run("choice.value, choice.index, choice.comm is not None").result == "('max', 1, True)"
    assert link_remote.run(f"# link: {remote}\nchoice.value").result == "'max'"


def test_outputs_that_cannot_come_back_are_named_and_the_rest_arrive(link_remote, remote):
    result = link_remote.run(f"# link: {remote}\nimport threading\nmade_lock = threading.Lock()\nmade_value = 5")
    assert result.status == "ok"
    assert "made_lock (_thread.lock): a lock belongs to the process" in result.stderr
    assert link_remote.run("(made_value, 'made_lock' in globals())").result == "(5, False)"


def test_in_and_out_override_detection(link_remote, remote):
    link_remote.run("p = 1\nq = 2")
    result = link_remote.run(f"# link: {remote} in=p out=r\nr = p + 10\ns = 'not wanted'\nq_seen = 'q' in globals()")
    assert result.status == "ok"
    assert link_remote.run("(r, 's' in globals(), 'q_seen' in globals())").result == "(11, False, False)"
    missing = link_remote.run(f"# link: {remote} in=nope\n1")
    assert missing.status == "error"


def test_unchanged_inputs_are_not_sent_again(link_remote, remote):
    link_remote.run("import numpy as np\nbig = np.arange(2**20, dtype=np.float64)")
    first = link_remote.run(f"# link: {remote}\ntotal = float(big.sum())")
    second = link_remote.run(f"# link: {remote}\ntotal = float(big.sum())")
    assert link_remote.run("total").result == str(float(sum(range(2**20))))
    assert first.reply["metadata"]["link"]["sent"] > 2**23
    assert second.reply["metadata"]["link"]["sent"] == 0


def test_a_deleted_value_is_not_sent_just_to_be_deleted(link_remote, remote):
    link_remote.run("import numpy as np\nheavy = np.ones(2**20)")
    result = link_remote.run(f"# link: {remote}\ndel heavy")
    assert result.status == "ok"
    assert result.reply["metadata"]["link"]["sent"] == 0
    assert link_remote.run("'heavy' in globals()").result == "False"


def test_torch_tensors_and_modules_come_back(link_remote, remote):
    link_remote.run("import torch\nx = torch.arange(6.0).reshape(2, 3)")
    result = link_remote.run(
        f"# link: {remote}\nimport torch\nlayer = torch.nn.Linear(3, 2)\n"
        "torch.nn.init.constant_(layer.weight, 1.0)\ntorch.nn.init.zeros_(layer.bias)\n"
        "y = layer(x).detach()\nx.mul_(2)"
    )
    assert result.status == "ok", result.text
    back = link_remote.run("(y.tolist(), x[0].tolist(), y.device.type, next(layer.parameters()).device.type)")
    assert eval(back.result) == ([[3.0, 3.0], [12.0, 12.0]], [0.0, 2.0, 4.0], "cpu", "cpu")


def test_the_gpu_hook_moves_tensors_to_the_cpu():
    """No GPU here: a tensor that says it lives on cuda stands in for one."""
    import pickle

    import torch

    from link_kernel import agent

    moved = []

    class OnGpu(torch.Tensor):
        @property
        def device(self):
            return torch.device("cuda", 0)

        def to(self, *args, **kwargs):
            moved.append(args)
            return torch.tensor(self.tolist())

    t = torch.tensor([1.0, 2.0]).as_subclass(OnGpu)
    pickled, buffers = agent.dumps({"weights": t})
    back = pickle.loads(pickled, buffers=buffers)["weights"]
    assert moved == [("cpu",)]
    assert type(back) is torch.Tensor and back.device.type == "cpu" and back.tolist() == [1.0, 2.0]


def test_an_input_changed_in_place_leaves_the_stored_blobs_as_they_were(link_remote, remote):
    """``a *= 2`` loads ``a`` as a private copy made at once; the blob it came from stays."""
    link_remote.run("import numpy as np\na = np.arange(2**18, dtype=np.float64)")
    for factor in (2, 4):
        assert link_remote.run(f"# link: {remote}\na *= 2").status == "ok"
        assert link_remote.run(f"bool((a == np.arange(2**18) * {factor}).all())").result == "True"
    # the first input again: its blob is on the host (sent 0 B), and still holds the input
    link_remote.run("a = np.arange(2**18, dtype=np.float64)")
    again = link_remote.run(f"# link: {remote}\na *= 2")
    assert again.reply["metadata"]["link"]["sent"] == 0
    assert link_remote.run("bool((a == np.arange(2**18) * 2).all())").result == "True"


def test_the_standby_holds_the_last_cells_data_ready(link_remote, remote):
    """The standby booted after a cell preloads that cell's big inputs and outputs:
    running the cell again finds them in memory, and %link status shows what it holds."""
    link_remote.run("import numpy as np\na = np.arange(2**18, dtype=np.float64)")
    assert link_remote.run(f"# link: {remote}\nb = a * 3\na *= 2").status == "ok"
    deadline = time.monotonic() + 30
    while True:
        status = link_remote.run("%link status").outputs[0]["content"]["data"]["text/plain"]
        if "standby kernel pid" in status or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    line = next(line for line in status.splitlines() if line.startswith(remote))
    assert re.search(r"holding 6\.\d MiB ready", line), status  # a as sent, b and a as they came back
    link_remote.run("a = np.arange(2**18, dtype=np.float64)")
    again = link_remote.run(f"# link: {remote}\nb = a * 3\na *= 2")
    assert again.reply["metadata"]["link"]["sent"] == 0
    assert again.reply["metadata"]["link"]["ready"] == ["a"]  # loaded from the standby's copy
    check = "bool((a == np.arange(2**18) * 2).all() and (b == np.arange(2**18) * 3).all())"
    assert link_remote.run(check).result == "True"
