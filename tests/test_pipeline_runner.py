"""The pipeline runner over a fake cell runner: real graph, real cache on disk, real blobs.

The fake (:class:`Notebook`) is a tiny kernel: it runs a component's code with exec in a
namespace dict, writes what the code bound as blobs with the agent (as the variable sync
does), restores entries by loading their blobs, and logs every run (the side-effect log
that proves which components ran). Time is a fake clock each run advances.
"""

from __future__ import annotations

import asyncio
import traceback
from pathlib import Path

import pytest

from link_kernel import agent
from link_kernel.errors import HostUnreachableError, PipelineCycleError, UnknownComponentError
from link_kernel.pipeline.cache import Cache
from link_kernel.pipeline.component import Component
from link_kernel.pipeline.graph import Graph
from link_kernel.pipeline.runner import Ran, Report, Runner, Step
from link_kernel.pipeline.units import format_seconds

ALGO = "sha256"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Notebook:
    """The kernel's side, faked: a namespace, a store, a log of runs."""

    def __init__(self, store: Path, clock: Clock, run_seconds: float = 3.2) -> None:
        self.store = store
        self.clock = clock
        self.ns: dict = {}
        self.log: list[str] = []
        self.restored: list[str] = []
        self.run_seconds = run_seconds
        self.fail_restore = False
        self.link_error: Exception | None = None

    async def hashes(self, names):
        return {n: agent.blob_of(self.ns[n], ALGO)[0] for n in names if n in self.ns}

    async def run(self, component: Component) -> Ran:
        self.log.append(component.name)
        self.clock.now += self.run_seconds
        if self.link_error is not None:
            raise self.link_error
        target = component.targets[0] if component.targets else "local"
        before = dict(self.ns)
        try:
            exec(compile(component.code, f"<cell {component.name}>", "exec"), self.ns)
        except Exception as exc:
            return Ran(
                target,
                error={
                    "ename": type(exc).__name__,
                    "evalue": str(exc),
                    "traceback": traceback.format_exception(exc),
                },
            )
        values = {}
        for name in component.binds:
            if name in self.ns and (name not in before or self.ns[name] is not before[name]):
                blob_id, parts = agent.blob_of(self.ns[name], ALGO)
                values[name] = agent.describe(self.ns[name], blob_id, parts, str(self.store))
        return Ran(target, values=values)

    async def restore(self, component, entry) -> bool:
        self.clock.now += 0.1
        if self.fail_restore:
            return False
        for name, blob_id in entry.outputs.items():
            self.ns[name] = agent.read_blob(str(self.store), blob_id)
        self.restored.append(component.name)
        return True


#: A branching pipeline of six components; 'left' and 'right' both bind 'model'.
CELLS = {
    "load": "# link: name=load\nrows = list(range(10))\n",
    "clean": "# link: name=clean after=load\nrows = [r for r in rows if r % 2 == 0]\n",
    "left": "# link: name=left after=clean\nmodel = ('left', sum(rows) * scale)\n",
    "right": "# link: gpu name=right after=clean\nmodel = ('right', max(rows))\n",
    "left_report": "# link: name=left_report after=left\nreport = f'{model[0]}: {model[1]}'\n",
    "right_report": "# link: name=right_report after=right\nreport = f'{model[0]}: {model[1]}'\n",
}


@pytest.fixture
def store(tmp_path) -> Path:
    return tmp_path / "link-kernel" / "blobs"


def setup(store: Path, cells: dict[str, str] = CELLS, ns: dict | None = None, clock: Clock | None = None):
    clock = clock or Clock()
    notebook = Notebook(store, clock)
    notebook.ns.update(ns if ns is not None else {"scale": 2})
    graph = Graph(Component.from_cell(source) for source in cells.values())
    runner = Runner(graph, Cache(store, clock=clock), notebook, clock=clock)
    return runner, notebook, graph


def go(runner: Runner, name: str) -> Report:
    return asyncio.run(runner.prepare(name))


def run_cell(runner: Runner, notebook: Notebook, name: str) -> Report:
    """What the kernel does for a cell with name=NAME: prepare, run it, record it."""
    report = go(runner, name)
    if report.failure is None:
        component = runner.graph.component(name)
        started = notebook.clock.now
        ran = asyncio.run(notebook.run(component))
        asyncio.run(runner.record(name, report.keys[name], ran, notebook.clock.now - started))
    return report


def test_a_leaf_runs_its_ancestors_in_order_with_one_line_each(store):
    runner, notebook, _ = setup(store)
    report = go(runner, "left_report")
    assert notebook.log == ["load", "clean", "left"]
    assert report.lines == [
        "load: ran on local in 3.2 s",
        "clean: ran on local in 3.2 s",
        "left: ran on local in 3.2 s",
    ]
    assert report.failure is None
    assert list(report.keys) == ["load", "clean", "left", "left_report"]
    assert notebook.ns["model"] == ("left", 40)


def test_a_second_run_restores_every_ancestor_from_the_cache(store):
    runner, notebook, _ = setup(store)
    go(runner, "left_report")
    notebook.log.clear()
    report = go(runner, "left_report")
    assert notebook.log == []
    assert notebook.restored == ["load", "clean", "left"]
    assert report.lines == ["load: from cache, saved 3.1 s"] * 1 + [
        "clean: from cache, saved 3.1 s",
        "left: from cache, saved 3.1 s",
    ]


def test_after_a_parent_changes_exactly_its_stale_descendants_run_in_order(store):
    runner, notebook, graph = setup(store)
    run_cell(runner, notebook, "left_report")
    run_cell(runner, notebook, "right_report")
    notebook.log.clear()
    graph.add(Component.from_cell("# link: name=clean after=load\nrows = [r for r in rows if r % 3 == 0]\n"))
    report = go(runner, "right_report")
    assert notebook.log == ["clean", "right"], "load is still valid"
    assert [s.action for s in report.steps] == ["restored", "ran", "ran"]
    assert notebook.ns["model"] == ("right", 9)
    notebook.log.clear()
    go(runner, "left_report")
    assert notebook.log == ["left"], "clean's new result is cached already"


def test_a_child_gets_its_own_branchs_value_of_a_shared_name(store):
    runner, notebook, _ = setup(store)
    run_cell(runner, notebook, "left_report")
    run_cell(runner, notebook, "right_report")
    assert notebook.ns["report"] == "right: 8"
    run_cell(runner, notebook, "left_report")  # right's 'model' is in the namespace now
    assert notebook.ns["report"] == "left: 40"
    run_cell(runner, notebook, "right_report")
    assert notebook.ns["report"] == "right: 8"


def test_a_changed_value_from_outside_the_pipeline_makes_its_reader_stale(store):
    runner, notebook, _ = setup(store)
    go(runner, "left_report")
    notebook.log.clear()
    notebook.ns["scale"] = 3
    go(runner, "left_report")
    assert notebook.log == ["left"]
    assert notebook.ns["model"] == ("left", 60)


def test_the_cache_survives_a_restart(store):
    runner, notebook, _ = setup(store)
    run_cell(runner, notebook, "left_report")
    # a new kernel: a fresh namespace, graph, cache object and runner, the same disk
    runner, notebook, _ = setup(store)
    report = go(runner, "left_report")
    assert notebook.log == [], "no parent ran again"
    assert [s.action for s in report.steps] == ["restored"] * 3
    assert notebook.ns["model"] == ("left", 40)
    report = go(runner, "right_report")
    assert notebook.log == ["right"]


def test_the_shown_component_is_recorded_for_its_children(store):
    cells = {**CELLS, "final": "# link: name=final after=left_report\nout = report.upper()\n"}
    runner, notebook, _ = setup(store, cells)
    run_cell(runner, notebook, "left_report")
    notebook.log.clear()
    report = go(runner, "final")
    assert notebook.log == []
    assert report.lines[-1] == "left_report: from cache, saved 3.1 s"


def test_cache_off_always_runs_and_is_never_cached(store):
    cells = {
        "load": "# link: name=load cache=off\nrows = [1, 2]\n",
        "total": "# link: name=total after=load\nn = sum(rows)\n",
        "show": "# link: name=show after=total cache=off\nprint(n)\n",
    }
    runner, notebook, _ = setup(store, cells)
    run_cell(runner, notebook, "show")
    notebook.log.clear()
    report = go(runner, "show")
    assert notebook.log == ["load"], "total's key does not change: load's code and inputs did not"
    assert [s.action for s in report.steps] == ["ran", "restored"]
    assert {e.component for e in runner.cache.entries()} == {"total"}


def test_clearing_the_cache_makes_the_next_run_recompute(store):
    runner, notebook, _ = setup(store)
    go(runner, "left_report")
    runner.cache.clear("clean")
    notebook.log.clear()
    go(runner, "left_report")
    assert notebook.log == ["clean"]
    runner.cache.clear()
    notebook.log.clear()
    go(runner, "left_report")
    assert notebook.log == ["load", "clean", "left"]


def test_a_failing_parent_stops_the_child_and_is_named(store):
    cells = {**CELLS, "clean": "# link: name=clean after=load\nrows = [r for r in rows]\nraise ValueError('bad rows')\n"}
    runner, notebook, _ = setup(store, cells)
    report = run_cell(runner, notebook, "left_report")
    assert notebook.log == ["load", "clean"], "left and the child do not run"
    assert report.failure is not None and report.failure.name == "clean"
    assert report.lines == ["load: ran on local in 3.2 s", "clean: failed on local after 3.2 s"]
    error = report.error_content()
    assert (error["ename"], error["evalue"]) == ("ValueError", "bad rows")
    assert error["traceback"][0] == "The parent component 'clean' failed on local; 'left_report' did not run."
    assert any("line 3" in line for line in error["traceback"]), "the parent's own line numbers"
    assert {e.component for e in runner.cache.entries()} == {"load"}, "a failed run is not cached"
    assert "report" not in notebook.ns


def test_a_link_error_in_a_parent_stops_the_pipeline(store):
    runner, notebook, _ = setup(store)
    notebook.link_error = HostUnreachableError("gpu", "host 'gpu' is unreachable")
    report = go(runner, "left_report")
    assert notebook.log == ["load"]
    error = report.error_content()
    assert error["ename"] == "HostUnreachableError"
    assert "host 'gpu' is unreachable" in error["evalue"]
    assert report.failure.action == "failed"


def test_an_entry_that_will_not_restore_is_run_again_and_dropped(store):
    runner, notebook, _ = setup(store)
    go(runner, "left_report")
    notebook.log.clear()
    notebook.fail_restore = True
    report = go(runner, "left_report")
    assert notebook.log == ["load", "clean", "left"]
    assert [s.action for s in report.steps] == ["ran"] * 3


def test_an_output_over_the_limit_runs_and_says_it_is_not_cached(store):
    cells = {"load": "# link: name=load\nrows = bytes(200_000)\n", "use": "# link: name=use after=load\nn = len(rows)\n"}
    runner, notebook, _ = setup(store, cells)
    runner.cache.limit = 1000
    report = go(runner, "use")
    assert report.steps[0].cached is False
    assert report.lines == ["load: ran on local in 3.2 s (not cached: over the cache's limit or a blob is missing)"]


def test_pipeline_errors_come_before_anything_runs(store):
    cells = {**CELLS, "left": "# link: name=left after=clean,cleen\nmodel = 1\n"}
    runner, notebook, _ = setup(store, cells)
    with pytest.raises(UnknownComponentError, match="unknown parent 'cleen'; known components: clean"):
        go(runner, "left_report")
    cycle = {"a": "# link: name=a after=b\nx = 1\n", "b": "# link: name=b after=a\ny = 1\n", "c": "# link: name=c after=b\n"}
    runner, notebook, _ = setup(store, cycle)
    with pytest.raises(PipelineCycleError, match="a -> b -> a"):
        go(runner, "c")
    with pytest.raises(UnknownComponentError, match="unknown component 'd'"):
        go(runner, "d")
    assert notebook.log == []


def test_a_component_without_parents_has_nothing_to_prepare(store):
    runner, notebook, _ = setup(store)
    report = go(runner, "load")
    assert (report.steps, report.lines, report.failure, report.error_content()) == ([], [], None, None)
    assert list(report.keys) == ["load"]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.004, "0.00 s"), (0.35, "0.35 s"), (3.24, "3.2 s"), (41.4, "41 s"), (125, "2 min 5 s"), (120, "2 min"), (-1, "0.00 s")],
)
def test_durations(seconds, text):
    assert format_seconds(seconds) == text


def test_step_lines():
    assert Step("clean", "ran", target="gpu", seconds=3.2).line == "clean: ran on gpu in 3.2 s"
    assert Step("load", "restored", saved=41).line == "load: from cache, saved 41 s"
    assert Step("x", "failed", seconds=0.5).line == "x: failed after 0.50 s"


# -- states for %link pipeline ---------------------------------------------------------------


def states(runner: Runner) -> dict[str, str]:
    return {row.name: row.state for row in asyncio.run(runner.states())}


def test_states_follow_the_runs(store):
    runner, notebook, graph = setup(store)
    assert set(states(runner).values()) == {"never run"}
    run_cell(runner, notebook, "left_report")
    assert states(runner) == {
        "load": "fresh",
        "clean": "fresh",
        "left": "fresh",
        "right": "never run",
        "left_report": "fresh",
        "right_report": "never run",
    }
    notebook.ns["scale"] = 5  # left reads it: its result is not the current one
    assert states(runner)["left"] == "stale" and states(runner)["left_report"] == "stale"
    notebook.ns["scale"] = 2
    assert states(runner)["left"] == "fresh"
    # after a restart the results are on disk, not in the namespace
    runner, notebook, graph = setup(store)
    now = states(runner)
    assert (now["load"], now["left_report"], now["right"]) == ("cached", "cached", "never run")
    rows = {row.name: row for row in asyncio.run(runner.states())}
    assert (rows["load"].target, round(rows["load"].seconds, 6)) == ("local", 3.2)
    assert rows["right"].target == "gpu", "where its routing comment says"


def test_a_failed_component_and_a_broken_one_are_listed(store):
    cells = {
        "load": "# link: name=load\nraise RuntimeError('no data')\n",
        "use": "# link: name=use after=load\nx = 1\n",
        "orphan": "# link: name=orphan after=ghost\ny = 1\n",
    }
    runner, notebook, _ = setup(store, cells)
    go(runner, "use")
    rows = {row.name: row for row in asyncio.run(runner.states())}
    assert rows["load"].state == "failed"
    assert rows["use"].state == "never run"
    assert rows["orphan"].state == "never run"
    assert "unknown parent 'ghost'" in rows["orphan"].problem
