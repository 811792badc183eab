"""The pipeline's pure parts: components from cells, and the graph (order, errors, keys, staleness).

No kernel, no I/O. Tables first, then hypothesis properties over random DAGs.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from link_kernel.errors import (
    DuplicateComponentError,
    LinkError,
    PipelineCycleError,
    PipelineError,
    RoutingError,
    UnknownComponentError,
)
from link_kernel.pipeline.component import Component
from link_kernel.pipeline.graph import Graph, Topology, component_key

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def comp(name: str, *parents: str, code: str = "", cell_id: str | None = None, **fields) -> Component:
    """A component as the graph sees it, without a cell to parse."""
    return Component(name=name, parents=parents, code=code or f"\n{name}_out = 1\n", cell_id=cell_id, **fields)


def cell(line: str, body: str = "x = 1\n", cell_id: str | None = None) -> Component:
    component = Component.from_cell(f"{line}\n{body}", cell_id)
    assert component is not None
    return component


def graph_of(**parents: str) -> Graph:
    """graph_of(b="a", c="a,b") is a <- b, (a, b) <- c."""
    return Graph(comp(n, *[p for p in ps.split(",") if p]) for n, ps in parents.items())


# -- components from cells -------------------------------------------------------------


def test_a_cell_becomes_a_component():
    source = "# link: gpu name=train after=load,clean\nmodel = fit(df, lr)\nscore = model.score(df)\n"
    component = Component.from_cell(source, "c-7")
    assert component is not None
    assert (component.name, component.parents, component.targets) == ("train", ("load", "clean"), ("gpu",))
    assert component.cache is True
    assert component.cell_id == "c-7"
    assert component.source == source
    assert component.code == "\nmodel = fit(df, lr)\nscore = model.score(df)\n", "the routing line blanked"
    assert {"fit", "df", "lr"} <= component.reads
    assert {"model", "score"} <= component.binds
    assert cell("# link: name=tidy", "del scratch\n").deletes == {"scratch"}


def test_a_cell_without_a_name_is_no_component():
    assert Component.from_cell("# link: gpu\nx = 1") is None
    assert Component.from_cell("x = 1") is None
    assert Component.from_cell("") is None


def test_cache_off_and_out_names():
    component = cell("# link: name=report after=train cache=off out=summary")
    assert component.cache is False
    assert component.outputs == ("summary",)


def test_a_malformed_cell_is_a_routing_error():
    with pytest.raises(RoutingError, match="bad parent"):
        Component.from_cell("# link: name=a after=1b\n")


def test_code_that_does_not_parse_is_still_a_component():
    component = cell("# link: name=broken", "def (:\n")
    assert (component.reads, component.binds, component.deletes) == (frozenset(),) * 3


def test_the_code_hash_ignores_the_routing_comment_and_line_endings():
    base = cell("# link: name=train after=load", "model = fit(df)\n")
    assert cell("# link: gpu|local keep name=train after=load timeout=9", "model = fit(df)\n").code_hash == base.code_hash
    assert cell("# link: name=train after=load", "model = fit(df)\r\n\n\n").code_hash == base.code_hash
    assert cell("# link: name=train after=load", "model = fit(df, 2)\n").code_hash != base.code_hash
    assert cell("# link: name=train after=load", "model  = fit(df)\n").code_hash != base.code_hash


def test_a_component_keeps_the_cells_line_numbers():
    source = "# link: name=a\n\nraise ValueError\n"
    assert cell("# link: name=a", "\nraise ValueError\n").code.splitlines()[2] == "raise ValueError"
    assert Component.from_cell(source).code.count("\n") == source.count("\n")


# -- order -------------------------------------------------------------------------------


def test_ancestors_come_after_their_parents():
    graph = graph_of(load="", clean="load", features="clean", split="load", train="features,split", report="train")
    order = graph.ancestors("report")
    assert order == ["load", "clean", "features", "split", "train"]
    assert graph.ancestors("load") == []
    assert graph.order() == ["load", "clean", "features", "split", "train", "report"]


def test_parents_run_in_the_order_after_names_them():
    graph = graph_of(a="", b="", child="b,a")
    assert graph.ancestors("child") == ["b", "a"]


def test_branches_are_not_ancestors_of_each_other():
    graph = graph_of(load="", left="load", right="load", left_report="left", right_report="right")
    assert graph.ancestors("left_report") == ["load", "left"]
    assert graph.ancestors("right_report") == ["load", "right"]
    assert graph.children("load") == ("left", "right")


def test_the_graph_is_a_topology():
    graph: Topology = graph_of(a="", b="a")
    assert "a" in graph and "z" not in graph and len(graph) == 2
    assert graph.names == ("a", "b")
    assert graph.component("b").parents == ("a",)


def test_a_long_chain_needs_no_recursion():
    graph = Graph(comp(f"c{i}", *([f"c{i - 1}"] if i else [])) for i in range(3000))
    assert graph.ancestors("c2999") == [f"c{i}" for i in range(2999)]


# -- errors, before anything runs -------------------------------------------------------


def test_an_unknown_parent_lists_the_known_components():
    graph = graph_of(load="", clean="load", train="laod,clean")
    with pytest.raises(UnknownComponentError) as info:
        graph.ancestors("train")
    err = info.value
    assert str(err) == "component 'train' names an unknown parent 'laod'; known components: load, clean, train"
    assert (err.name, err.child) == ("laod", "train")
    assert isinstance(err, PipelineError) and isinstance(err, LinkError)
    assert err.hint


def test_an_unknown_parent_deep_in_the_ancestry_is_found():
    graph = graph_of(a="ghost", b="a", c="b")
    with pytest.raises(UnknownComponentError, match="component 'a' names an unknown parent 'ghost'"):
        graph.ancestors("c")


def test_an_unknown_component_to_run():
    with pytest.raises(UnknownComponentError) as info:
        graph_of(train="", test="").ancestors("tran")
    assert str(info.value) == "unknown component 'tran'; known components: train, test"
    with pytest.raises(UnknownComponentError, match="known components: none yet"):
        Graph().ancestors("x")


@pytest.mark.parametrize(
    ("parents", "root", "message"),
    [
        ({"a": "b", "b": "a"}, "a", "the pipeline has a cycle: a -> b -> a"),
        ({"a": "c", "b": "a", "c": "b"}, "a", "the pipeline has a cycle: a -> b -> c -> a"),
        ({"a": "c", "b": "a", "c": "b"}, "c", "the pipeline has a cycle: a -> b -> c -> a"),
        ({"load": "", "x": "load,z", "y": "x", "z": "y", "leaf": "z"}, "leaf", "cycle: x -> y -> z -> x"),
    ],
)
def test_a_cycle_is_named_in_run_order(parents, root, message):
    graph = graph_of(**parents)
    with pytest.raises(PipelineCycleError) as info:
        graph.ancestors(root)
    assert message in str(info.value)
    assert info.value.cycle[0] == info.value.cycle[-1]


def test_a_cycle_elsewhere_does_not_stop_an_unrelated_component():
    graph = graph_of(a="", b="a", x="y", y="x")
    assert graph.ancestors("b") == ["a"]
    with pytest.raises(PipelineCycleError):
        graph.order()


def test_two_cells_with_one_name_are_told_apart_by_cell_id():
    graph = Graph([cell("# link: name=load", "df = 1\n", cell_id="c1")])
    with pytest.raises(DuplicateComponentError) as info:
        graph.add(cell("# link: name=load", "df = 2\n", cell_id="c2"))
    assert str(info.value) == "two cells declare the component 'load': cell c1 and cell c2"
    assert graph.component("load").code_hash == cell("# link: name=load", "df = 1\n").code_hash, "left as it was"


def test_a_cell_whose_code_moved_to_a_new_cell_can_replace_the_old_one():
    graph = Graph([cell("# link: name=load", "df = 1\n", cell_id="c1")])
    graph.add(cell("# link: name=load", "df = 2\n", cell_id="c2"), replace_other=True)
    assert (graph.component("load").cell_id, len(graph)) == ("c2", 1)


def test_the_same_cell_run_again_with_new_code_replaces_its_component():
    graph = Graph([cell("# link: name=load", "df = 1\n", cell_id="c1")])
    old = graph.add(cell("# link: gpu name=load", "df = 2\n", cell_id="c1"))
    assert old is not None and old.code == "\ndf = 1\n"
    assert graph.component("load").code == "\ndf = 2\n"
    assert graph.component("load").targets == ("gpu",)
    assert len(graph) == 1


def test_without_cell_ids_a_new_run_replaces_the_component():
    graph = Graph([cell("# link: name=load", "df = 1\n")])
    graph.add(cell("# link: name=load", "df = 2\n"))
    assert graph.component("load").code == "\ndf = 2\n"


def test_a_run_without_cell_id_keeps_the_id_the_saved_notebook_gave():
    graph = Graph([cell("# link: name=load", "df = 1\n", cell_id="c1")])
    graph.add(cell("# link: name=load", "df = 1\n"))
    assert graph.component("load").cell_id == "c1"
    with pytest.raises(DuplicateComponentError):
        graph.add(cell("# link: name=load", "df = 1\n", cell_id="c2"))


def test_a_renamed_cell_drops_its_old_name():
    graph = Graph([cell("# link: name=load", cell_id="c1"), cell("# link: name=clean after=load", cell_id="c2")])
    graph.add(cell("# link: name=read", cell_id="c1"))
    assert graph.names == ("clean", "read")
    with pytest.raises(UnknownComponentError, match="unknown parent 'load'"):
        graph.ancestors("clean")
    assert graph.remove_cell("c2") is not None
    assert graph.names == ("read",)
    assert graph.remove("read") is not None and len(graph) == 0


def test_a_saved_notebook_with_two_cells_of_one_name_is_refused():
    cells = [cell("# link: name=load", "df = 1\n"), cell("# link: name=load", "df = 2\n")]
    with pytest.raises(DuplicateComponentError, match="two cells declare the component 'load': 'df = 1' and 'df = 2'"):
        Graph.of_notebook(cells)
    same = [cell("# link: name=load", "df = 1\n"), cell("# link: gpu name=load", "df = 1\n")]
    assert len(Graph.of_notebook(same)) == 1
    with pytest.raises(DuplicateComponentError):
        Graph.of_notebook([cell("# link: name=a", cell_id="c1"), cell("# link: name=a", cell_id="c2")])


# -- which values come from outside the pipeline -----------------------------------------


def test_external_reads_leave_out_what_ancestors_bind():
    graph = Graph(
        [
            cell("# link: name=load", "df = read(path)\n"),
            cell("# link: name=clean after=load", "df = df.dropna(thresh=limit)\n"),
            cell("# link: name=train after=clean", "model = Model(lr).fit(df)\n"),
        ]
    )
    assert {"read", "path"} <= graph.external_reads("load")
    assert "limit" in graph.external_reads("clean") and "df" not in graph.external_reads("clean")
    assert "lr" in graph.external_reads("train") and "df" not in graph.external_reads("train")


def test_a_sibling_branch_is_outside_the_pipeline_of_a_component():
    graph = Graph(
        [
            cell("# link: name=load", "x = 1\n"),
            cell("# link: name=left after=load", "y = x + 1\n"),
            cell("# link: name=right after=load", "y = x + 2\n"),
            cell("# link: name=report after=left", "print(y)\n"),
        ]
    )
    assert "y" not in graph.external_reads("report")
    assert "y" in cell("# link: name=other", "print(y)\n").reads


# -- cache keys ---------------------------------------------------------------------------


def pipeline(load: str = "df = read(path)\n", clean: str = "df = df.dropna()\n", *, target: str = "") -> Graph:
    return Graph(
        [
            cell(f"# link: {target}name=load", load),
            cell(f"# link: {target}name=clean after=load", clean),
            cell("# link: name=train after=clean", "model = fit(df, lr)\n"),
        ]
    )


INPUTS = {"load": {"path": "h-path"}, "train": {"lr": "h-lr"}}


def test_keys_of_a_component_and_its_ancestors():
    keys = pipeline().keys("train", INPUTS)
    assert list(keys) == ["load", "clean", "train"]
    assert len(set(keys.values())) == 3
    assert all(len(k) == 64 and int(k, 16) >= 0 for k in keys.values())
    assert pipeline().keys("train", INPUTS) == keys, "deterministic"


def test_a_new_target_keeps_every_key():
    assert pipeline(target="gpu ").keys("train", INPUTS) == pipeline().keys("train", INPUTS)


def test_a_parents_new_code_changes_its_key_and_its_descendants_only():
    before = pipeline().keys("train", INPUTS)
    after = pipeline(clean="df = df.dropna(how='all')\n").keys("train", INPUTS)
    assert after["load"] == before["load"]
    assert after["clean"] != before["clean"]
    assert after["train"] != before["train"]


def test_an_input_from_outside_changes_the_key_of_the_component_that_reads_it():
    before = pipeline().keys("train", INPUTS)
    after = pipeline().keys("train", {**INPUTS, "train": {"lr": "h-lr2"}})
    assert after["load"] == before["load"] and after["clean"] == before["clean"]
    assert after["train"] != before["train"]
    upstream = pipeline().keys("train", {**INPUTS, "load": {"path": "h-other"}})
    assert all(upstream[n] != before[n] for n in before)


def test_a_missing_input_is_not_an_empty_one():
    assert pipeline().keys("train", {}) != pipeline().keys("train", {"load": {"path": ""}})


def test_the_key_covers_out_names_and_the_order_of_parents():
    a = Graph([comp("p"), comp("q"), comp("c", "p", "q")]).keys("c", {})
    b = Graph([comp("p"), comp("q"), comp("c", "q", "p")]).keys("c", {})
    assert a["c"] != b["c"]
    plain = component_key(comp("c"), [], {})
    assert component_key(comp("c", outputs=("x",)), [], {}) != plain
    assert component_key(comp("c", cache=False, targets=("gpu",)), [], {}) == plain


# -- staleness ------------------------------------------------------------------------------


def test_stale_ancestors_are_those_whose_key_is_not_cached():
    graph = pipeline()
    keys = graph.keys("train", INPUTS)
    assert graph.stale("train", keys, set()) == ["load", "clean"]
    assert graph.stale("train", keys, set(keys.values())) == []
    changed = pipeline(clean="df = df.fillna(0)\n")
    new = changed.keys("train", INPUTS)
    assert changed.stale("train", new, set(keys.values())) == ["clean"]


def test_cache_off_is_always_stale():
    graph = Graph([comp("load", cache=False), comp("train", "load")])
    keys = graph.keys("train", {})
    assert graph.stale("train", keys, set(keys.values())) == ["load"]


def test_an_old_entry_of_a_component_is_valid_again_when_its_code_comes_back():
    cached = set(pipeline().keys("train", INPUTS).values())
    cached |= set(pipeline(clean="df = df.fillna(0)\n").keys("train", INPUTS).values())
    graph = pipeline()
    assert graph.stale("train", graph.keys("train", INPUTS), cached) == []


# -- properties over random graphs ---------------------------------------------------------


@st.composite
def dags(draw, min_size: int = 1, max_size: int = 12) -> tuple[list[str], dict[str, tuple[str, ...]]]:
    """A random DAG: each component's parents are drawn from the ones named before it."""
    n = draw(st.integers(min_size, max_size))
    names = [f"c{i}" for i in draw(st.permutations(range(n)))]
    parents = {
        name: tuple(draw(st.lists(st.sampled_from(names[:i]), unique=True, max_size=4)) if i else ())
        for i, name in enumerate(names)
    }
    order = draw(st.permutations(names))  # the graph is fed in any order
    return list(order), parents


@FAST
@given(dags())
def test_topological_order_respects_every_edge(dag):
    order, parents = dag
    graph = Graph(comp(n, *parents[n]) for n in order)
    full = graph.order()
    assert sorted(full) == sorted(order)
    position = {n: i for i, n in enumerate(full)}
    for child, ps in parents.items():
        for parent in ps:
            assert position[parent] < position[child]
    for name in order:
        ancestors = graph.ancestors(name)
        assert name not in ancestors
        assert len(set(ancestors)) == len(ancestors)
        expected = set()
        todo = list(parents[name])
        while todo:
            p = todo.pop()
            if p not in expected:
                expected.add(p)
                todo.extend(parents[p])
        assert set(ancestors) == expected
        seen = set()
        for a in ancestors:
            assert set(parents[a]) <= seen
            seen.add(a)


@FAST
@given(dags(min_size=2), st.data())
def test_a_back_edge_always_makes_a_cycle_that_is_found_and_named(dag, data):
    order, parents = dag
    # an edge from a descendant back to its ancestor closes a cycle
    edges = [(child, p) for child, ps in parents.items() for p in ps]
    if not edges:
        parents = {**parents, order[0]: (order[1],), order[1]: (order[0],)}
    else:
        child, parent = data.draw(st.sampled_from(edges))
        parents = {**parents, parent: (*parents[parent], child)}
    graph = Graph(comp(n, *parents[n]) for n in order)
    with pytest.raises(PipelineCycleError) as info:
        graph.order()
    cycle = info.value.cycle
    assert cycle[0] == cycle[-1] and len(cycle) >= 3 and cycle[0] == min(cycle)
    for before, after in zip(cycle, cycle[1:]):
        assert before in parents[after], f"{before} -> {after} is an edge"
    assert " -> ".join(cycle) in str(info.value)


@FAST
@given(dags(), st.data())
def test_changing_one_component_changes_exactly_its_descendants_keys(dag, data):
    order, parents = dag
    graph = Graph(comp(n, *parents[n]) for n in order)
    leaves = [n for n in order if not graph.children(n)]
    before = {}
    for leaf in leaves:
        before.update(graph.keys(leaf, {}))
    changed = data.draw(st.sampled_from(order))
    graph.add(comp(changed, *parents[changed], code="\nsomething_else = 2\n"))
    after = {}
    for leaf in leaves:
        after.update(graph.keys(leaf, {}))
    descendants = {changed}
    grew = True
    while grew:
        grew = False
        for child, ps in parents.items():
            if child not in descendants and descendants & set(ps):
                descendants.add(child)
                grew = True
    assert {n for n in order if after[n] != before[n]} == descendants
    cached = set(before.values())
    for leaf in leaves:
        stale = set(graph.stale(leaf, graph.keys(leaf, {}), cached))
        assert stale == (set(graph.ancestors(leaf)) & descendants)
