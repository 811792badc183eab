"""%link pipeline's picture and list (link_kernel.pipeline.picture): pure, no kernel."""

from __future__ import annotations

from link_kernel.pipeline.picture import STATES, Row, markdown, mermaid, text

ROWS = [
    Row("load", (), "fresh", "local", 41.2),
    Row("clean", ("load",), "cached", "gpu", 3.24),
    Row("left", ("clean",), "stale", "gpu", 0.5),
    Row("right", ("clean",), "failed", "local", 1.0),
    Row("left_report", ("left",), "never run", "gpu|local"),
    Row("end", ("left", "right", "ghost"), "never run", "", None, "component 'end' names an unknown parent 'ghost'"),
]


def test_the_list_has_one_line_per_component():
    lines = text(ROWS).splitlines()
    assert lines[0].split() == ["component", "state", "target", "last", "run", "after"]
    assert lines[1].split() == ["load", "fresh", "local", "41", "s", "-"]
    assert lines[2].split() == ["clean", "cached", "gpu", "3.2", "s", "load"]
    assert lines[5].split() == ["left_report", "never", "run", "gpu|local", "-", "left"]
    assert lines[6].split() == ["end", "never", "run", "-", "-", "left,right,ghost"]
    assert lines[7] == "end: component 'end' names an unknown parent 'ghost'"


def test_the_picture_is_a_mermaid_flowchart_with_every_edge_and_state():
    chart = mermaid(ROWS)
    assert chart.startswith("flowchart TD\n")
    assert '  c0["load<br/>fresh · local · 41 s"]:::fresh' in chart
    assert '  c4["left_report<br/>never run · gpu|local"]:::never_run' in chart
    for edge in ["c0 --> c1", "c1 --> c2", "c1 --> c3", "c2 --> c4", "c2 --> c5", "c3 --> c5", "u0 --> c5"]:
        assert f"  {edge}\n" in chart + "\n"
    assert 'u0["ghost<br/>unknown"]:::unknown' in chart
    for state in STATES:
        assert f"classDef {state.replace(' ', '_')} fill:" in chart
    assert '  c5["end<br/>never run"]' in chart, "a reserved word is only a label"


def test_labels_are_escaped():
    chart = mermaid([Row("a", (), "fresh", 'user@host"<x>&')])
    assert "user@host#quot;#lt;x#gt;#amp;" in chart


def test_markdown_has_the_picture_then_the_list():
    md = markdown(ROWS)
    assert md.startswith("```mermaid\nflowchart TD\n")
    assert "```\n\n```\ncomponent" in md
    assert markdown([]) == text([]) == "no pipeline components yet: declare one with '# link: name=NAME'"
