"""Module state travels both ways between the local kernel and remote cells.

Generators, os.environ, sys.path, warnings filters, matplotlib rcParams and
pandas options: a notebook whose cells run remotely gives what plain
ipykernel gives. And the standby imports the notebook's modules ahead of the
next cell.
"""

from __future__ import annotations

import struct

import pytest
from kernel_client import start_client

SEED = "import random, numpy as np, torch\nrandom.seed(0)\nnp.random.seed(0)\ntorch.manual_seed(0)"
DRAW = (
    "print(random.random(), random.randint(0, 10**9), np.random.rand(3).tolist(), "
    "np.random.normal(), torch.rand(2).tolist(), torch.randint(0, 10**6, (1,)).item())"
)


def draws(client, remote: str | None) -> list[str]:
    """Seed, then draw local, remote, local, remote (remote=None: all where the kernel is)."""
    assert client.run(SEED).status == "ok"
    out = []
    for where in ("local", "remote", "local", "remote"):
        prefix = f"# link: {remote}\n" if remote and where == "remote" else ""
        result = client.run(prefix + DRAW)
        assert result.status == "ok", result.text
        out.append(result.stdout)
    return out


@pytest.fixture(scope="module")
def plain_draws() -> list[str]:
    """The draws in plain ipykernel: one kernel for both hosts' tests."""
    plain = start_client("python3")
    try:
        return draws(plain, None)
    finally:
        plain.shutdown()


def test_seeded_draws_match_plain_ipykernel(link_remote, remote, plain_draws):
    expected = plain_draws
    assert len(set(expected)) == 4  # each cell draws new numbers
    assert draws(link_remote, remote) == expected


def test_a_generator_seeded_remotely_comes_back(link_remote, remote):
    link_remote.run("import random\nrandom.seed(1)")
    assert link_remote.run(f"# link: {remote}\nrandom.seed(7)\nfirst = random.random()").status == "ok"
    after_remote = link_remote.run("random.random()").result
    assert link_remote.run("random.seed(7)\nrandom.random() == first").result == "True"
    assert link_remote.run("random.random()").result == after_remote  # the second draw of seed 7


def test_torch_is_not_imported_for_a_cell_that_does_not_use_it(link_remote, remote):
    link_remote.run("import torch\ntorch.manual_seed(3)")
    expected = link_remote.run("torch.manual_seed(3)\ntorch.rand(1).item()").result
    link_remote.run("torch.manual_seed(3)")
    result = link_remote.run(f"# link: {remote}\nimport sys\n'torch' in sys.modules")
    assert result.result in ("True", "False")  # a standby may have it imported; no error either way
    late = link_remote.run(f"# link: {remote}\nimport torch as t\nt.rand(1).item()")
    assert late.result == expected


def test_environ_travels_both_ways(link_remote, remote):
    link_remote.run("import os\nos.environ['LINK_TEST_LOCAL'] = 'from here'\nos.environ.pop('LINK_TEST_GONE', None)")
    result = link_remote.run(
        f"# link: {remote}\nimport os\n"
        "print(os.environ.get('LINK_TEST_LOCAL'))\n"
        "os.environ['LINK_TEST_REMOTE'] = 'from there'"
    )
    assert result.stdout == "from here\n", result.text
    assert link_remote.run("os.environ.get('LINK_TEST_REMOTE')").result == "'from there'"
    link_remote.run("del os.environ['LINK_TEST_LOCAL']")
    gone = link_remote.run(f"# link: {remote}\nimport os\n'LINK_TEST_LOCAL' in os.environ")
    assert gone.result == "False"


def test_the_hosts_own_variables_stay_on_each_side(link_remote, remote):
    local_home = link_remote.run("import os\nos.environ['HOME']").result
    link_remote.run("os.environ['JPY_SOMETHING'] = 'local'")
    result = link_remote.run(
        f"# link: {remote}\nimport os\n"
        "seen = os.environ.get('JPY_SOMETHING')\n"
        "os.environ['HOME'] = '/nowhere'\nos.environ['PATH'] = '/nowhere'"
    )
    assert result.status == "ok"
    assert link_remote.run("repr(seen)").result == "'None'"
    assert link_remote.run("os.environ['HOME']").result == local_home
    assert link_remote.run("os.environ['PATH'] != '/nowhere'").result == "True"


def test_sys_path_additions_travel(link_remote, remote):
    link_remote.run(
        "import os, sys\nos.makedirs('libdir', exist_ok=True)\n"
        "open('libdir/helper_mod.py', 'w').write('VALUE = 42\\n')\n"
        "sys.path.insert(0, os.path.abspath('libdir'))"
    )
    result = link_remote.run(f"# link: {remote}\nimport helper_mod\nhelper_mod.VALUE")
    assert result.result == "42", result.text
    result = link_remote.run(f"# link: {remote}\nimport sys\nsys.path.append('/opt/link-test-extra')")
    assert result.status == "ok"
    assert link_remote.run("sys.path[-1]").result == "'/opt/link-test-extra'"


def test_warnings_filters_travel(link_remote, remote):
    warn = "import warnings\nwarnings.warn('watch out', UserWarning)"
    assert "watch out" in link_remote.run(f"# link: {remote}\n{warn}").stderr
    link_remote.run("import warnings\nwarnings.filterwarnings('ignore')")
    result = link_remote.run(f"# link: {remote}\n{warn}\nprint('done')")
    assert result.stdout == "done\n"
    assert "watch out" not in result.stderr
    link_remote.run("warnings.resetwarnings()\nwarnings.simplefilter('default')")
    link_remote.run(f"# link: {remote}\nimport warnings\nwarnings.filterwarnings('error', message='strict')")
    raised = link_remote.run("warnings.warn('strict mode', UserWarning)")
    assert raised.error is not None and raised.error["ename"] == "UserWarning"
    link_remote.run("warnings.resetwarnings()\nwarnings.simplefilter('default')")


def png_size(result) -> tuple[int, int]:
    import base64

    images = [m["content"]["data"]["image/png"] for m in result.of_type("display_data")
              if "image/png" in m["content"]["data"]]
    assert len(images) == 1, result.text
    return struct.unpack(">II", base64.b64decode(images[0])[16:24])


def test_rcparams_and_inline_settings_shape_remote_figures(link_remote, remote):
    plot = "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()"
    default = png_size(link_remote.run(plot))
    link_remote.run("import matplotlib\nmatplotlib.rcParams['figure.figsize'] = (2.5, 1.5)")
    local = png_size(link_remote.run(plot))
    assert local != default
    assert png_size(link_remote.run(f"# link: {remote}\n{plot}")) == local
    link_remote.run("%config InlineBackend.figure_formats = ['svg']")
    svg = link_remote.run(f"# link: {remote}\n{plot}")
    assert [set(m["content"]["data"]) for m in svg.of_type("display_data")] == [{"image/svg+xml", "text/plain"}]
    link_remote.run("%config InlineBackend.figure_formats = ['png']")
    link_remote.run(f"# link: {remote}\nimport matplotlib\nmatplotlib.rcParams['figure.figsize'] = (3.5, 2.5)")
    assert link_remote.run("tuple(matplotlib.rcParams['figure.figsize'])").result == "(3.5, 2.5)"
    link_remote.run("matplotlib.rcdefaults()")


def test_pandas_options_shape_a_remote_repr(link_remote, remote):
    link_remote.run("import pandas as pd\nframe = pd.DataFrame({'x': range(100)})")
    link_remote.run("pd.set_option('display.max_rows', 5)")
    local = link_remote.run("frame")
    remote_repr = link_remote.run(f"# link: {remote}\nframe")
    assert remote_repr.result == local.result
    assert len(remote_repr.result.splitlines()) < 12
    link_remote.run(f"# link: {remote}\nimport pandas as pd\npd.set_option('display.precision', 2)")
    assert link_remote.run("pd.get_option('display.precision')").result == "2"
    link_remote.run("pd.reset_option('all')")


@pytest.mark.parametrize("module", ["sklearn.linear_model", "pandas"])
def test_the_standby_has_the_notebooks_modules_imported(remote, tmp_path, module):
    client = start_client("link", cwd=str(tmp_path))
    try:
        name = module.rpartition(".")[2]
        setup = (f"from sklearn.linear_model import LinearRegression" if "." in module
                 else f"import {module} as {name}_alias")
        assert client.run(setup).status == "ok"
        assert client.run(f"# link: {remote}\n1").status == "ok"  # the standby boots after this
        check = client.run(f"# link: {remote}\nimport sys\n{module!r} in sys.modules", timeout=120)
        assert check.result == "True", check.text
    finally:
        client.shutdown()


def test_numpy_print_options_shape_a_remote_repr(link_remote, remote):
    link_remote.run("import numpy as np\nnp.set_printoptions(precision=3, suppress=True)\n"
                    "v = np.array([1e-9, 1/3, 2.0])")
    local = link_remote.run("v")
    assert local.result == "array([0.   , 0.333, 2.   ])", local.text
    assert link_remote.run(f"# link: {remote}\nv").result == local.result
    link_remote.run(f"# link: {remote}\nimport numpy as np\nnp.set_printoptions(precision=1)")
    assert link_remote.run("v").result == "array([0. , 0.3, 2. ])"  # suppress stays as it was
    link_remote.run(f"# link: {remote}\nimport numpy as np\nnp.set_printoptions(suppress=False, precision=8)")
    assert link_remote.run("v").result == "array([1.00000000e-09, 3.33333333e-01, 2.00000000e+00])"


def test_a_generator_seeded_remotely_stays_seeded_before_the_local_kernel_imports_it(remote, tmp_path):
    """numpy imports numpy.random only when first used: the state a remote cell left
    goes with the next remote cell, though the local kernel has not imported it yet."""
    client = start_client("link", cwd=str(tmp_path))
    try:
        first = client.run(f"# link: {remote}\nimport numpy as np\nnp.random.seed(5)\nnp.random.rand()")
        assert first.status == "ok", first.text
        assert client.run("import sys\n'numpy.random' in sys.modules").result == "False"
        second = client.run(f"# link: {remote}\nnp.random.rand()")
        assert client.run("np.random.rand()").result == "0.20671915533942642"
    finally:
        client.shutdown()
    assert (first.result, second.result) == ("0.22199317108973948", "0.8707323061773764"), second.text


def test_a_figure_shown_again_in_a_later_cell_is_an_image(link_remote, remote):
    """``fig`` on a cell's last line shows the figure, as the inline backend does for
    any figure once it has loaded, though the host's kernel never drew it."""
    link_remote.run("import matplotlib.pyplot as plt\nfig, ax = plt.subplots(figsize=(3, 2))\nax.plot([1, 3, 2]);")
    local = link_remote.run("ax.set_title('again')\nfig")
    there = link_remote.run(f"# link: {remote}\nax.set_title('again')\nfig")
    shown = [set(m["content"]["data"]) for m in there.of_type("execute_result")]
    assert shown == [set(m["content"]["data"]) for m in local.of_type("execute_result")], there.text
    assert shown == [{"image/png", "text/plain"}]


def test_logging_configuration_travels_both_ways(link_remote, remote):
    link_remote.run(
        "import logging\n"
        "logging.basicConfig(level=logging.INFO, format='%(levelname)s|%(name)s|%(message)s', force=True)"
    )
    result = link_remote.run(f"# link: {remote}\nimport logging\nlogging.getLogger('nb').info('hello')")
    assert result.stderr == "INFO|nb|hello\n", result.text
    link_remote.run(f"# link: {remote}\nimport logging\nlogging.getLogger('nb').setLevel(logging.ERROR)")
    assert link_remote.run("logging.getLogger('nb').level").result == "40"
    quiet = link_remote.run(f"# link: {remote}\nimport logging\nlogging.getLogger('nb').warning('hidden')")
    assert quiet.stderr == "", quiet.text
    link_remote.run("logging.root.handlers.clear()\nlogging.root.setLevel(logging.WARNING)\n"
                    "logging.getLogger('nb').setLevel(logging.NOTSET)")
    silent = link_remote.run(f"# link: {remote}\nimport logging\nlogging.getLogger('nb').warning('to stderr')")
    assert silent.stderr == "to stderr\n", silent.text  # logging's last resort, as a plain kernel


def test_the_working_directory_travels_both_ways(link_remote, remote):
    """A cell that moves into a folder of the notebook's leaves the next cell there,
    wherever either runs; a folder outside it is not carried."""
    base = link_remote.run("import os\nos.getcwd()").result
    moved = link_remote.run(
        f"# link: {remote}\nimport os\nos.makedirs('wd_sub', exist_ok=True)\nos.chdir('wd_sub')\n"
        "open('inside.txt', 'w').write('inside')"
    )
    assert moved.status == "ok", moved.text
    where = "os.path.basename(os.getcwd()), open('inside.txt').read()"
    assert link_remote.run(where).result == "('wd_sub', 'inside')"
    assert link_remote.run(f"# link: {remote}\nimport os\n{where}").result == "('wd_sub', 'inside')"
    link_remote.run(f"# link: {remote}\nimport os\nos.chdir('..')")
    assert link_remote.run("os.getcwd()").result == base
    link_remote.run(f"# link: {remote}\nimport os\nos.chdir('/')")
    assert link_remote.run("os.getcwd()").result == base
    link_remote.run(f"os.chdir({base})")
