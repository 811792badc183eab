"""What the kernel reads from the saved notebook at its start (link_kernel.warmup)."""

from __future__ import annotations

import json

from link_kernel.warmup import MODULES_MAX, cell_sources, imported_modules, read, routed_hosts

KNOWN = ["local", "gpu", "proc", "slurm"]


def test_hosts_are_the_first_choice_of_each_routing_comment_and_default():
    sources = [
        "import numpy as np",
        "# link: gpu|local\nx = 1",
        "# link: local\ny = 2",
        "# link: nowhere|proc\nz = 3",  # an unknown first choice: the cell says so when run
        "# link: gpu x=\nbad",  # malformed: skipped
        "%link default slurm|local\n",
        "# link: proc\n# link: gpu",
    ]
    assert routed_hosts(sources, KNOWN) == ["gpu", "slurm", "proc"]
    assert routed_hosts(["x = 1", "# link: local\n1"], KNOWN) == []


def test_modules_are_what_the_cells_import_without_the_notebooks_own(tmp_path):
    (tmp_path / "helpers.py").write_text("")
    (tmp_path / "pkg").mkdir()
    sources = [
        "import numpy as np, pandas as pd\nimport os.path",
        "%matplotlib inline\nfrom sklearn.linear_model import (\n    LinearRegression,\n)",
        "!pip list\nimport helpers\nfrom pkg import thing\nfrom . import local\nfrom __future__ import annotations",
        "def f():\n    import scipy.stats\n    return scipy.stats",
        "print('import this')\nimport numpy",
    ]
    assert imported_modules(sources, tmp_path) == [
        "numpy", "pandas", "os.path", "sklearn.linear_model", "scipy.stats",
    ]
    many = [f"import mod{i}" for i in range(MODULES_MAX + 5)]
    assert len(imported_modules(many, tmp_path)) == MODULES_MAX


def test_a_notebook_file_gives_its_code_cells(tmp_path):
    path = tmp_path / "a.ipynb"
    path.write_text(json.dumps({"cells": [
        {"cell_type": "markdown", "source": "# link: gpu"},
        {"cell_type": "code", "source": ["# link: gpu\n", "x = 1"]},
        {"cell_type": "code", "source": "y = 2"},
    ]}))
    assert read(path) == ["# link: gpu\nx = 1", "y = 2"]
    (tmp_path / "b.ipynb").write_text("{not json")
    assert read(tmp_path / "b.ipynb") == [] and read(tmp_path / "none.ipynb") == []
    assert cell_sources({"cells": "nope"}) == [] and cell_sources([]) == []
