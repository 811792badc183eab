"""nbclient runs the quickstart notebook headless through the installed kernelspec."""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
from nbclient import NotebookClient

EXAMPLE = Path(__file__).parent.parent / "examples" / "quickstart.ipynb"


def test_quickstart_runs_through_link(tmp_path):
    notebook = tmp_path / "quickstart.ipynb"
    shutil.copy(EXAMPLE, notebook)
    nb = nbformat.read(notebook, as_version=4)
    NotebookClient(
        nb, kernel_name="link", timeout=300, resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    for cell in code:
        assert not [o for o in cell.outputs if o.output_type == "error"], cell.source
    text = ["".join(o.get("text", "") or o.get("data", {}).get("text/plain", "")
                    for o in c.outputs if "link" not in o.get("metadata", {}))
            for c in code]
    notes = [o for c in code for o in c.outputs if "link" in o.get("metadata", {})]
    assert len(notes) == 3 and all(n.data["text/plain"].startswith("[link] ran on process") for n in notes)
    assert "mean residual 0.08" in text[1]
    assert text[2].startswith("[-0.  1.  2.  3.  4.  5.  6.  7.]")
    assert text[3] == text[4], "keep did not reuse the kernel"
    assert text[5] == "2"
    assert "released: process" in text[6]
    assert (tmp_path / "weights.txt").exists()


PIPELINE = Path(__file__).parent.parent / "examples" / "pipeline.ipynb"


def test_the_pipeline_example_runs_through_link(tmp_path):
    import os
    import re

    notebook = tmp_path / "pipeline.ipynb"
    shutil.copy(PIPELINE, notebook)
    nb = nbformat.read(notebook, as_version=4)
    client = NotebookClient(nb, kernel_name="link", timeout=300, resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env={**os.environ, "JPY_SESSION_NAME": str(notebook), "XDG_CACHE_HOME": str(tmp_path / "cache")})
    code = [c for c in nb.cells if c.cell_type == "code"]
    for cell in code:
        assert not [o for o in cell.outputs if o.output_type == "error"], cell.source

    def text(cell) -> str:
        return "".join(o.get("text", "") or o.get("data", {}).get("text/plain", "") for o in cell.outputs)

    by_first = {c.source.split("\n")[0]: text(c) for c in code}
    assert "least squares [ 1.  -2.   0.5  3. ]" in by_first["# link: name=fit_report after=fit"]
    assert "zero weights" in by_first["# link: name=baseline_report after=baseline"]
    assert "[link] fit: from cache, saved" in by_first["# link: name=fit_report after=fit"]
    states = re.findall(r"^\w+\s+(fresh|stale|cached|failed|never run)\s", by_first["%link pipeline"], re.M)
    assert states == ["fresh"] * 6
    assert "[link] baseline: ran on local" in by_first["%link cache clear baseline"]
