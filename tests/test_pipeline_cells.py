"""The runner over a real ipykernel and its agent (link_kernel.pipeline.cells.AgentCells).

What the Link kernel will do once it is wired, minus the router: hashes, exports and
restores go through a real kernel's agent into a real blob store; the cache survives a
kernel restart. Each component appends its name to a log file, the side effect that
proves which ones ran.
"""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

import pytest
from kernel_client import start_client

from link_kernel.pipeline.cache import Cache
from link_kernel.pipeline.cells import AgentCells
from link_kernel.pipeline.component import Component
from link_kernel.pipeline.graph import Graph
from link_kernel.pipeline.runner import Ran, Runner

INSTALL = "__import__('link_kernel.agent', fromlist=['install']).install(get_ipython(), False)"


def logged(name: str, body: str) -> str:
    return f"open(LOG, 'a').write('{name}\\n')\n{body}"


CELLS = [
    "# link: name=load\n" + logged("load", "import numpy as np\ndata = np.arange(1_000_000, dtype=np.float64)\n"),
    "# link: name=clean after=load\n" + logged("clean", "data = data[data % 3 != 0] * scale\n"),
    "# link: name=train after=clean\n" + logged("train", "total = float(data.sum())\nlock = __import__('threading').Lock()\n"),
    "# link: name=report after=train\nprint(round(total))\n",
]


class Kernel:
    """A plain ipykernel with the agent, and the two callables the router would give."""

    def __init__(self, log: Path) -> None:
        self.client = start_client("python3", env={"PYTHONPATH": os.environ.get("PYTHONPATH", "")})
        assert self.client.run(INSTALL).status == "ok"
        assert self.client.run(f"LOG = {str(log)!r}\nscale = 2.0").status == "ok"

    async def call(self, code: str, expressions: dict[str, str]) -> dict:
        reply = self.client.request("execute", code, silent=True, store_history=False, user_expressions=expressions)
        content = reply["content"]
        assert content["status"] == "ok", content
        return {k: v["data"]["text/plain"] for k, v in content["user_expressions"].items()}

    def cells(self, store: Path) -> AgentCells:
        async def run(component: Component) -> Ran:
            result = self.client.run(component.source)
            if result.status != "ok":
                return Ran("local", error=result.error)
            return await cells.outputs(component)

        cells = AgentCells(self.call, store, run, algo="sha256")
        return cells


@pytest.fixture
def kernels(tmp_path):
    started = []

    def start() -> Kernel:
        kernel = Kernel(tmp_path / "ran.log")
        started.append(kernel)
        return kernel

    yield start
    for kernel in started:
        kernel.client.shutdown()


def runner_for(kernel: Kernel, store: Path) -> Runner:
    graph = Graph(Component.from_cell(source) for source in CELLS)
    return Runner(graph, Cache(store), kernel.cells(store))


def test_a_real_kernel_restores_its_parents_from_the_cache_after_a_restart(kernels, tmp_path):
    store = tmp_path / "cache" / "link-kernel" / "blobs"
    log = tmp_path / "ran.log"
    kernel = kernels()
    report = asyncio.run(runner_for(kernel, store).prepare("report"))
    assert log.read_text().split() == ["load", "clean", "train"]
    assert [s.action for s in report.steps] == ["ran", "ran", "ran"]
    assert "not cached: 'lock' cannot be saved" in report.lines[2], "a lock cannot be cached"
    assert kernel.client.run("print(round(total))").stdout == "666665333334\n"
    kernel.client.shutdown()

    log.write_text("")
    kernel = kernels()  # a restart: a fresh namespace, the same disk
    report = asyncio.run(runner_for(kernel, store).prepare("report"))
    assert log.read_text().split() == ["train"], "load and clean came from the cache"
    assert [s.action for s in report.steps] == ["restored", "restored", "ran"]
    assert report.lines[0].startswith("load: from cache, saved ")
    assert kernel.client.run("(type(np).__name__, data.shape, round(total))").result == "('module', (666666,), 666665333334)"

    log.write_text("")
    assert kernel.client.run("scale = 3.0").status == "ok"  # clean reads it from the notebook
    report = asyncio.run(runner_for(kernel, store).prepare("report"))
    assert log.read_text().split() == ["clean", "train"]
    assert kernel.client.run("round(total)").result == "999998000001"


def test_a_failing_parent_in_a_real_kernel_is_named_with_its_line_numbers(kernels, tmp_path):
    store = tmp_path / "blobs"
    kernel = kernels()
    graph = Graph(
        [
            Component.from_cell("# link: name=load\nx = 1\n\nraise KeyError('missing column')\n"),
            Component.from_cell("# link: name=use after=load\ny = x\n"),
        ]
    )
    report = asyncio.run(Runner(graph, Cache(store), kernel.cells(store)).prepare("use"))
    error = report.error_content()
    assert error["ename"] == "KeyError"
    assert error["traceback"][0] == "The parent component 'load' failed on local; 'use' did not run."
    plain = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in error["traceback"]]
    assert any(re.search(r"^-*> 4 raise KeyError", line, re.M) for line in plain), plain
