"""Link (hybrid) in JupyterLab, as a user meets it: launcher, cells, input, widgets, interrupt."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from lab import JupyterLab, Notebook, write_notebook
from playwright.sync_api import Locator, Page, expect

#: The quiet line the router puts under each remote cell.
NOTE = re.compile(r"^⇢ ran on process in \d+\.\d\d s")


@pytest.fixture
def snap(page: Page, shots: Path):
    """``snap(name)`` saves the page, or ``snap(name, locator)`` one element, as name.png."""

    def save(name: str, target: Page | Locator | None = None) -> Path:
        path = shots / f"{name}.png"
        (target or page).screenshot(path=str(path))
        return path

    return save


#: In the page, the nodes (label text, classes) and the edge count of a Mermaid image's SVG.
_SVG_NODES = """img => {
    const svg = decodeURIComponent(img.src.slice(img.src.indexOf(",") + 1));
    const doc = new DOMParser().parseFromString(svg, "image/svg+xml");
    doc.querySelectorAll("br").forEach(br => br.replaceWith(" "));  // a label's lines
    const nodes = [...doc.querySelectorAll("g.node")].map(g => ({
        label: g.textContent.replace(/\\s+/g, " ").trim(),
        classes: g.getAttribute("class").split(/\\s+/),
    }));
    return [nodes, doc.querySelectorAll("path.flowchart-link").length];
}"""


def open_notebook(page: Page, lab: JupyterLab, name: str, cells: list[str]) -> Notebook:
    write_notebook(lab.root / name, cells)
    page.goto(lab.workspace_url(name))
    notebook = Notebook(page)
    notebook.wait_ready()
    return notebook


def test_launcher_opens_a_link_notebook(page: Page, lab: JupyterLab, snap) -> None:
    page.goto(lab.workspace_url())
    card = page.locator(".jp-LauncherCard[data-category='Notebook'][title='Link (hybrid)']")
    expect(card).to_be_visible()
    logo = card.locator("img.jp-Launcher-kernelIcon")
    expect(logo).to_have_attribute("src", re.compile(r"/kernelspecs/link/logo-"))
    assert logo.evaluate("img => img.complete && img.naturalWidth > 0"), "logo did not load"
    snap("01-launcher-link-card")

    card.click()
    notebook = Notebook(page)
    notebook.wait_ready()  # toolbar and status bar say "Link (hybrid)", idle
    notebook.set_source(0, "import sys\nprint('kernel python', sys.version_info[:2])")
    expect(notebook.run(0)).to_have_text([re.compile(r"^kernel python \(3, \d+\)")])
    notebook.save()
    snap("02-new-link-notebook")

    saved = json.loads((lab.root / "Untitled.ipynb").read_text())
    assert saved["metadata"]["kernelspec"]["name"] == "link"


def test_local_and_process_cells(page: Page, lab: JupyterLab, snap) -> None:
    notebook = open_notebook(
        page,
        lab,
        "cells.ipynb",
        [
            "import os\nlocal_pid = os.getpid()\nprint('local cell in', local_pid)",
            "# link: process\nimport os\n"
            "print('process cell in', os.getpid(), 'read local_pid', local_pid)\n"
            "local_pid == os.getpid()",
        ],
    )
    local = notebook.run(0)
    expect(local).to_have_text([re.compile(r"^local cell in \d+")])
    local_pid = int(local.inner_text().split()[-1])

    remote = notebook.run(1)
    expect(remote).to_have_count(3)  # stdout, the result, the note
    printed, result, note = remote.all()
    expect(printed).to_have_text(re.compile(rf"^process cell in (\d+) read local_pid {local_pid}"))
    assert int(printed.inner_text().split()[3]) != local_pid
    expect(result).to_have_text("False")
    expect(note).to_have_text(NOTE)
    notebook.save()
    snap("03-local-and-process-cells")
    snap("04-process-cell-with-its-note", notebook.cell(1))

    saved = json.loads((lab.root / "cells.ipynb").read_text())
    notes = [o for o in saved["cells"][1]["outputs"] if "link" in o.get("metadata", {})]
    assert [n["metadata"]["link"]["target"] for n in notes] == ["process"]
    assert re.match(r"\[link\] ran on process in \d+\.\d\d s", "".join(notes[0]["data"]["text/plain"]))
    assert not any("link" in o.get("metadata", {}) for o in saved["cells"][0]["outputs"])


def test_input_is_answered_in_the_page(page: Page, lab: JupyterLab, snap) -> None:
    notebook = open_notebook(
        page,
        lab,
        "input.ipynb",
        [
            "name = input('your name? ')\nprint('hello', name)",
            "# link: process\nanswer = input('process asks: ')\nprint('process got', answer)",
        ],
    )
    for index, answer in ((0, "Ada"), (1, "Grace")):
        notebook.start(index)
        box = notebook.cell(index).locator("input.jp-Stdin-input")
        box.fill(answer)
        if index == 1:
            snap("05-input-prompt-in-process-cell")
        box.press("Enter")
        notebook.wait_done(index)

    expect(notebook.outputs(0)).to_have_text(["your name?  Ada", "hello Ada"])
    expect(notebook.outputs(1)).to_have_text(
        ["process asks:  Grace", "process got Grace", NOTE]
    )
    snap("06-input-answered")


def test_widget_renders_and_reacts(page: Page, lab: JupyterLab, snap) -> None:
    notebook = open_notebook(
        page,
        lab,
        "widget.ipynb",
        [
            "from ipywidgets import IntSlider\n"
            "slider = IntSlider(value=3, min=0, max=10, description='n')\nslider",
            "slider.value",
            "slider.value = 8",
        ],
    )
    notebook.run(0)
    widget = notebook.cell(0).locator(".widget-slider")
    # "Error displaying widget: model not found" here means the page dropped the comm_open
    expect(widget).to_be_visible()
    handle = widget.locator(".noUi-handle")
    readout = widget.locator(".widget-readout")
    expect(handle).to_have_attribute("aria-valuenow", "3.0")

    # the page moves it, the kernel sees the new value
    handle.focus()
    handle.press("ArrowRight")
    handle.press("ArrowRight")
    expect(readout).to_have_text("5")
    expect(notebook.run(1)).to_have_text(["5"])

    # the kernel moves it, the page follows
    notebook.run(2)
    expect(readout).to_have_text("8")
    expect(handle).to_have_attribute("aria-valuenow", "8.0")
    snap("07-widget-moved-both-ways")


def test_interrupt_stops_a_process_cell(page: Page, lab: JupyterLab, snap) -> None:
    notebook = open_notebook(
        page,
        lab,
        "interrupt.ipynb",
        [
            "# link: process\nimport time\nprint('sleeping', flush=True)\ntime.sleep(60)",
            "1 + 1",
        ],
    )
    notebook.start(0)
    # the print says time.sleep(60) has begun in the process kernel
    expect(notebook.outputs(0)).to_have_text(["sleeping"])
    expect(notebook.indicator).to_have_attribute("data-status", "busy")
    snap("08-process-cell-sleeping")

    notebook.panel.locator("jp-button[data-command='notebook:interrupt-kernel']").click()
    notebook.wait_done(0, timeout=15_000)  # not the 60 s
    expect(notebook.error(0)).to_contain_text("KeyboardInterrupt")
    expect(notebook.idle).to_have_count(1)
    expect(notebook.status_bar).to_have_text("Link (hybrid) | Idle")
    snap("09-interrupted-and-idle")

    expect(notebook.run(1)).to_have_text(["2"])  # the kernel still answers


def test_pipeline_graph_renders(page: Page, lab: JupyterLab, snap) -> None:
    """``%link pipeline`` in JupyterLab: the Mermaid block of its text/markdown output is
    drawn as a graph (an SVG whose nodes are the components, each with its state)."""
    cells = [
        "# link: name=load\nrows = list(range(100))",
        "# link: name=clean after=load\nrows = [r for r in rows if r % 3]",
        "# link: name=fit after=clean\nmodel = sum(rows)",
        "# link: name=baseline after=clean\nmodel = 0\nraise ValueError('no baseline yet')",
        "# link: name=report after=fit\nprint('fit model', model)",
        "# link: name=compare after=fit,baseline\nprint(model)",
        "%link pipeline",
    ]
    notebook = open_notebook(page, lab, "pipeline.ipynb", cells)
    # report brings load, clean and fit up to date (run hidden): four fresh components
    expect(notebook.run(4)).to_have_text(
        [*(re.compile(rf"^↳ {name}: ran on local in ") for name in ("load", "clean", "fit")),
         re.compile(r"^fit model 3267\s*$")]
    )
    notebook.run(3)  # baseline raises: failed
    expect(notebook.error(3)).to_contain_text("ValueError")
    # fit edited and run again: its child report is stale; compare never ran
    notebook.set_source(2, "# link: name=fit after=clean\nmodel = 2 * sum(rows)")
    notebook.run(2)

    notebook.run(6)
    output = notebook.outputs(6)
    expect(output).to_have_count(1)
    expect(output).to_have_attribute("data-mime-type", "text/markdown")
    # JupyterLab draws the block as an SVG image: loaded, not the block's text or a warning
    picture = output.locator(".jp-RenderedMermaid:not(.jp-mod-warning) figure img")
    expect(picture).to_be_visible()
    expect(picture).to_have_attribute("src", re.compile(r"^data:image/svg\+xml,"))
    picture.evaluate("img => img.decode()")
    size = picture.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert min(size) > 100, f"the graph is {size} pixels"
    nodes, edges = picture.evaluate(_SVG_NODES)
    states = {
        "load": "fresh",
        "clean": "fresh",
        "fit": "fresh",
        "baseline": "failed",
        "report": "stale",
        "compare": "never run",
    }
    assert {n["label"].split()[0]: n for n in nodes}.keys() == states.keys(), nodes
    for node in nodes:
        name, state = node["label"].split()[0], states[node["label"].split()[0]]
        assert node["label"].startswith(f"{name} {state}"), node
        assert state.replace(" ", "_") in node["classes"], node
    assert edges == 6, "load-clean, clean-fit, clean-baseline, fit-report, fit-compare, baseline-compare"
    # the text list under the picture, for the record
    expect(output).to_contain_text(re.compile(r"report\s+stale"))
    snap("10-pipeline-graph", output)
