"""Notebooks through real git: the merge driver and diff that ``link-kernel git install``
registers, driven as users drive them (``git merge``, ``git rebase``, ``git cherry-pick``,
``git diff``) in temporary repositories with a git config of their own.

Every merge case runs three ways. The sides are the same in each: "ours" is the commit
on main, "theirs" the commit on the branch (``git merge side`` on main; ``git rebase main``
on the branch, which replays theirs onto ours; ``git cherry-pick side`` on main). For each:
git's exit status, ``git status --porcelain``, nbformat validation, the pipeline check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from link_kernel.notebook_git.check import pipeline_problems
from link_kernel.notebook_git.driver import CRASHED

ROOT = Path(__file__).resolve().parents[1]
WAYS = ["merge", "rebase", "cherry-pick"]


class Repo:
    """A git repository in ``tmp_path`` whose git sees only its own config and HOME."""

    def __init__(self, tmp_path: Path) -> None:
        home = tmp_path / "home"
        home.mkdir()
        self.path = tmp_path / "repo"
        self.path.mkdir()
        self.env = {
            k: v for k, v in os.environ.items() if not k.startswith("GIT_") and k != "XDG_CONFIG_HOME"
        }
        self.env.update(
            HOME=str(home),
            GIT_CONFIG_GLOBAL=str(home / "gitconfig"),
            GIT_CONFIG_NOSYSTEM="1",
            GIT_EDITOR="true",
            XDG_CONFIG_HOME=str(home / ".config"),
            # the driver git runs imports this checkout's code, as the tests do
            PYTHONPATH=os.pathsep.join([str(ROOT), self.env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        )
        (home / "gitconfig").write_text(
            "[user]\n\tname = Test User\n\temail = test@example.com\n"
            "[init]\n\tdefaultBranch = main\n[commit]\n\tgpgsign = false\n"
            "[advice]\n\tdetachedHead = false\n"
        )
        self.git("init", "-q")

    def git(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(
            ["git", *args], cwd=self.path, env=self.env, capture_output=True, text=True, check=False
        )
        if check and done.returncode != 0:
            raise AssertionError(f"git {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done

    def link(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "link_kernel.cli", "git", *args],
            cwd=self.path, env=self.env, capture_output=True, text=True, check=False,
        )

    def write(self, cells: list, name: str = "nb.ipynb") -> None:
        (self.path / name).write_text(notebook_text(cells))

    def commit(self, message: str, cells: list | None = None, name: str = "nb.ipynb") -> None:
        if cells is not None:
            self.write(cells, name)
        self.git("add", "-A")
        self.git("commit", "-q", "-m", message)

    def notebook(self, name: str = "nb.ipynb") -> dict:
        return json.loads((self.path / name).read_text())

    def porcelain(self) -> str:
        return self.git("status", "--porcelain").stdout


def notebook_text(cells: list) -> str:
    """A notebook (nbformat 4.5) of ``(id, source[, cell_type])`` cells, as nbformat writes it."""
    nb = nbformat.v4.new_notebook()
    for cell_id, source, *kind in cells:
        if (kind or ["code"])[0] == "markdown":
            cell = nbformat.v4.new_markdown_cell(source)
        else:
            cell = nbformat.v4.new_code_cell(source)
        cell.id = cell_id
        nb.cells.append(cell)
    return nbformat.writes(nb)


@pytest.fixture
def repo(tmp_path) -> Repo:
    repo = Repo(tmp_path)
    done = repo.link("install")
    assert done.returncode == 0, done.stderr
    return repo


def three_way(repo: Repo, way: str, base: list, ours: list, theirs: list) -> subprocess.CompletedProcess:
    """Commit base, then ours on main and theirs on the branch 'side'; combine them ``way``."""
    repo.commit("base", base)
    repo.git("checkout", "-q", "-b", "side")
    repo.commit("theirs", theirs)
    repo.git("checkout", "-q", "main")
    repo.commit("ours", ours)
    if way == "merge":
        return repo.git("merge", "--no-edit", "side", check=False)
    if way == "rebase":
        repo.git("checkout", "-q", "side")
        return repo.git("rebase", "main", check=False)
    return repo.git("cherry-pick", "side", check=False)


def sources(repo: Repo) -> dict[str, str]:
    return {cell["id"]: "".join(cell["source"]) for cell in repo.notebook()["cells"]}


def valid(repo: Repo) -> nbformat.NotebookNode:
    nb = nbformat.read(repo.path / "nb.ipynb", as_version=4)
    nbformat.validate(nb)
    return nb


def assert_clean(repo: Repo, done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stdout + done.stderr
    assert repo.porcelain() == ""
    valid(repo)
    assert pipeline_problems(repo.notebook()) == []


def assert_conflict(repo: Repo, done: subprocess.CompletedProcess) -> str:
    """The merge stopped on nb.ipynb: unmerged, yet valid nbformat; git's output returned."""
    assert done.returncode != 0, done.stdout + done.stderr
    assert repo.porcelain().splitlines() == ["UU nb.ipynb"]
    valid(repo)
    return done.stdout + done.stderr


LOAD = ("load", "# link: name=load\nx = 1\n")
TRAIN = ("train", "# link: name=train after=load\ny = x + 1\n")
REPORT = ("report", "# link: name=report after=train\nprint(y)\n")
NOTES = ("notes", "Notes on the run.\n", "markdown")
BASE = [LOAD, TRAIN, REPORT, NOTES]


def edited(cells: list, cell_id: str, source: str) -> list:
    return [(c[0], source, *c[2:]) if c[0] == cell_id else c for c in cells]


# -- the matrix ----------------------------------------------------------------------


@pytest.mark.parametrize("way", WAYS)
def test_edits_to_different_cells_merge_cleanly(repo, way):
    ours = edited(BASE, "load", "# link: name=load\nx = 2\n")
    theirs = edited(BASE, "report", "# link: name=report after=train\nprint(y * 2)\n")
    assert_clean(repo, three_way(repo, way, BASE, ours, theirs))
    got = sources(repo)
    assert got["load"] == "# link: name=load\nx = 2\n"
    assert got["report"] == "# link: name=report after=train\nprint(y * 2)\n"
    assert list(got) == ["load", "train", "report", "notes"]


@pytest.mark.parametrize("way", WAYS)
def test_a_target_changed_on_one_side_and_the_body_on_the_other_merge(repo, way):
    ours = edited(BASE, "train", "# link: gpu name=train after=load\ny = x + 1\n")
    theirs = edited(BASE, "train", "# link: name=train after=load\ny = x + 3\n")
    assert_clean(repo, three_way(repo, way, BASE, ours, theirs))
    assert sources(repo)["train"] == "# link: gpu name=train after=load\ny = x + 3\n"


@pytest.mark.parametrize("way", WAYS)
def test_both_sides_editing_one_cell_is_a_conflict_below_the_routing_line(repo, way):
    ours = edited(BASE, "train", "# link: name=train after=load\ny = x + 2\n")
    theirs = edited(BASE, "train", "# link: name=train after=load\ny = x + 3\n")
    output = assert_conflict(repo, three_way(repo, way, BASE, ours, theirs))
    assert "component 'train': both sides changed the same lines" in output
    train = sources(repo)["train"].splitlines()
    assert train[0] == "# link: name=train after=load"
    assert train[1].startswith("<<<<<<< ")
    assert "y = x + 2" in train and "y = x + 3" in train and "=======" in train
    assert pipeline_problems(repo.notebook()) == [], "the routing line still parses"


@pytest.mark.parametrize("way", WAYS)
def test_routing_keys_changed_differently_on_both_sides_conflict_below_the_first_line(repo, way):
    ours = edited(BASE, "train", "# link: gpu name=train after=load\ny = x + 1\n")
    theirs = edited(BASE, "train", "# link: tesla name=train after=load\ny = x + 1\n")
    output = assert_conflict(repo, three_way(repo, way, BASE, ours, theirs))
    assert "routing line's target" in output
    train = sources(repo)["train"].splitlines()
    assert train[0] == "# link: gpu name=train after=load"
    assert train[1:6] == [
        "<<<<<<< ours",
        "# link: gpu name=train after=load",
        "||||||| base",
        "# link: name=train after=load",
        "=======",
    ]


@pytest.mark.parametrize("way", WAYS)
def test_a_delete_against_an_edit_keeps_the_edit_between_markers(repo, way):
    ours = [c for c in BASE if c[0] != "report"]
    theirs = edited(BASE, "report", "# link: name=report after=train\nprint(y * 2)\n")
    output = assert_conflict(repo, three_way(repo, way, BASE, ours, theirs))
    assert "component 'report': deleted on ours, edited on theirs" in output
    report = sources(repo)["report"].splitlines()
    assert report[0] == "# link: name=report after=train"
    assert report[1] == "<<<<<<< ours"
    assert "deleted on ours" in report[2]
    assert report[3:] == ["=======", "print(y * 2)", ">>>>>>> theirs"]


@pytest.mark.parametrize("way", WAYS)
def test_a_delete_against_no_change_deletes(repo, way):
    ours = [c for c in BASE if c[0] != "notes"]
    theirs = edited(BASE, "load", "# link: name=load\nx = 5\n")
    assert_clean(repo, three_way(repo, way, BASE, ours, theirs))
    assert list(sources(repo)) == ["load", "train", "report"]


@pytest.mark.parametrize("way", WAYS)
def test_two_similar_inserts_at_one_place_are_both_kept_ours_first(repo, way):
    ours = [LOAD, ("extra_a", "# link: name=extra_a after=load\nprint('extra', 1)\n"), *BASE[1:]]
    theirs = [LOAD, ("extra_b", "# link: name=extra_b after=load\nprint('extra', 2)\n"), *BASE[1:]]
    assert_clean(repo, three_way(repo, way, BASE, ours, theirs))
    assert list(sources(repo)) == ["load", "extra_a", "extra_b", "train", "report", "notes"]


@pytest.mark.parametrize("way", WAYS)
def test_identical_inserts_on_both_sides_are_one_cell(repo, way):
    same = ("same", "print('same on both sides')\n")
    # theirs edits another cell too, so the two notebooks differ and the driver runs
    theirs = [*edited(BASE, "load", "# link: name=load\nx = 4\n"), same]
    assert_clean(repo, three_way(repo, way, BASE, [*BASE, same], theirs))
    assert list(sources(repo)) == ["load", "train", "report", "notes", "same"]
    assert sources(repo)["load"].endswith("x = 4\n")


@pytest.mark.parametrize("way", WAYS)
def test_a_move_against_an_edit_is_one_cell_moved_and_edited(repo, way):
    ours = [NOTES, *BASE[:3]]
    theirs = edited(BASE, "notes", "Notes on the run, edited.\n")
    assert_clean(repo, three_way(repo, way, BASE, ours, theirs))
    got = sources(repo)
    assert list(got) == ["notes", "load", "train", "report"]
    assert got["notes"] == "Notes on the run, edited.\n"


@pytest.mark.parametrize("way", WAYS)
def test_a_rename_against_a_new_child_of_the_old_name_follows_the_rename(repo, way):
    ours = [
        ("load", "# link: name=ingest\nx = 1\n"),
        ("train", "# link: name=train after=ingest\ny = x + 1\n"),
        REPORT,
        NOTES,
    ]
    theirs = [*BASE, ("plot", "# link: name=plot after=load,report\nprint('plot', x)\n")]
    assert_clean(repo, three_way(repo, way, BASE, ours, theirs))
    got = sources(repo)
    assert got["plot"] == "# link: name=plot after=ingest,report\nprint('plot', x)\n"
    assert got["load"].startswith("# link: name=ingest\n")


@pytest.mark.parametrize("way", WAYS)
def test_a_merge_that_makes_a_cycle_is_a_conflict_that_says_so(repo, way):
    side = ("side", "# link: name=side\nz = 0\n")
    base = [*BASE, side]
    ours = edited(base, "side", "# link: name=side after=report\nz = 0\n")
    theirs = edited(base, "load", "# link: name=load after=side\nx = 1\n")
    output = assert_conflict(repo, three_way(repo, way, base, ours, theirs))
    assert "the pipeline has a cycle: load -> train -> report -> side -> load" in output
    problems = pipeline_problems(repo.notebook())
    assert problems and "cycle" in problems[0]


@pytest.mark.parametrize("way", WAYS)
def test_a_merge_that_leaves_a_dangling_parent_is_a_conflict_that_says_so(repo, way):
    ours = [c for c in BASE if c[0] != "report"]
    theirs = [*BASE, ("plot", "# link: name=plot after=report\nprint(y)\n")]
    output = assert_conflict(repo, three_way(repo, way, BASE, ours, theirs))
    assert "component 'plot' names an unknown parent 'report'" in output
    assert "report" not in sources(repo)


# -- the driver's own failure ----------------------------------------------------------


@pytest.mark.parametrize("way", WAYS)
def test_a_driver_crash_stops_git_and_leaves_our_side(repo, way):
    theirs_text = notebook_text(edited(BASE, "load", "# link: name=load\nx = 9\n"))
    repo.commit("base", BASE)
    repo.git("checkout", "-q", "-b", "side")
    (repo.path / "nb.ipynb").write_text(theirs_text[:-40])  # cut short: not JSON
    repo.commit("theirs")
    repo.git("checkout", "-q", "main")
    ours = edited(BASE, "report", "# link: name=report after=train\nprint(-y)\n")
    repo.commit("ours", ours)
    ours_text = (repo.path / "nb.ipynb").read_text()
    if way == "merge":
        done = repo.git("merge", "--no-edit", "side", check=False)
    elif way == "rebase":
        repo.git("checkout", "-q", "side")
        done = repo.git("rebase", "main", check=False)
    else:
        done = repo.git("cherry-pick", "side", check=False)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "the notebook merge driver failed on nb.ipynb" in output
    assert "theirs of nb.ipynb is not JSON" in output
    assert repo.porcelain().splitlines() == ["UU nb.ipynb"]
    assert (repo.path / "nb.ipynb").read_text() == ours_text, "ours, untouched"


def test_the_driver_exits_above_128_when_it_crashes_and_1_on_a_conflict(tmp_path):
    base, ours, theirs = (tmp_path / n for n in ("base", "ours", "theirs"))
    base.write_text(notebook_text(BASE))
    ours.write_text(notebook_text(edited(BASE, "load", "# link: name=load\nx = 2\n")))
    theirs.write_text("{not json")
    argv = [sys.executable, "-m", "link_kernel.cli", "git", "merge-driver"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    before = ours.read_text()
    done = subprocess.run([*argv, str(base), str(ours), str(theirs), "nb.ipynb"], env=env,
                          capture_output=True, text=True, check=False, cwd=tmp_path)
    assert done.returncode == CRASHED > 128, done.stderr
    assert ours.read_text() == before
    theirs.write_text(notebook_text(edited(BASE, "load", "# link: name=load\nx = 3\n")))
    done = subprocess.run([*argv, str(base), str(ours), str(theirs), "nb.ipynb"], env=env,
                          capture_output=True, text=True, check=False, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    nbformat.validate(nbformat.reads(ours.read_text(), as_version=4))


# -- diff, log, install ----------------------------------------------------------------


def test_git_diff_shows_cells_and_routing_lines_not_json(repo):
    repo.commit("base", BASE)
    repo.write(edited(BASE, "train", "# link: gpu name=train after=load\ny = x + 1\n"))
    diff = repo.git("diff").stdout
    assert "-# link: name=train after=load\n+# link: gpu name=train after=load\n" in diff
    assert " # ---- cell 2 [code] id=train\n" in diff
    assert '"cell_type"' not in diff and '"source"' not in diff
    shown = repo.git("show", "HEAD").stdout
    assert "+# ---- cell 4 [markdown] id=notes\n+Notes on the run.\n" in shown


def test_git_log_lists_what_each_commit_did_to_the_components(repo):
    repo.commit("add the pipeline", BASE)
    renamed = [
        ("load", "# link: name=ingest\nx = 1\n"),
        ("train", "# link: name=train after=ingest\ny = x + 1\n"),
        REPORT,
        NOTES,
    ]
    repo.commit("rename load", renamed)
    trained = edited(renamed, "train", "# link: name=train after=ingest\ny = x * 2\n")
    repo.commit("edit train", trained)
    repo.commit("drop report", [c for c in trained if c[0] != "report"])
    repo.commit("only notes", edited([c for c in trained if c[0] != "report"], "notes", "New notes.\n"))
    done = repo.link("log", "nb.ipynb")
    assert done.returncode == 0, done.stderr
    blocks = {}
    for line in done.stdout.splitlines():
        if line.startswith("    "):
            blocks[subject].append(line.strip())
        else:
            subject = line.split("  ", 1)[1]
            blocks[subject] = []
    assert blocks == {
        "only notes": ["(no component changed)"],
        "drop report": ["removed report"],
        "edit train": ["edited train"],
        "rename load": ["renamed load -> ingest", "re-parented train: load -> ingest"],
        "add the pipeline": ["added load", "added train (after load)", "added report (after train)"],
    }
    assert list(blocks) == ["only notes", "drop report", "edit train", "rename load", "add the pipeline"]


def test_install_status_and_uninstall(repo):
    done = repo.link("status")
    assert done.stdout.startswith("installed\n"), done.stdout
    assert f"merge.link-ipynb.driver = {sys.executable} -m link_kernel.cli git merge-driver" in done.stdout
    assert "  a notebook here gets merge=link-ipynb\n  a notebook here gets diff=link-ipynb\n" in done.stdout
    attributes = repo.path / ".git" / "info" / "attributes"
    assert "*.ipynb merge=link-ipynb diff=link-ipynb" in attributes.read_text()
    assert repo.link("install").returncode == 0
    assert attributes.read_text().count("merge=link-ipynb") == 1, "installing twice writes once"
    check = repo.git("check-attr", "merge", "diff", "--", "a.ipynb").stdout
    assert check == "a.ipynb: merge: link-ipynb\na.ipynb: diff: link-ipynb\n"
    done = repo.link("uninstall")
    assert done.returncode == 0, done.stderr
    assert "merge=link-ipynb" not in attributes.read_text()
    assert repo.git("config", "--get", "merge.link-ipynb.driver", check=False).returncode == 1
    status = repo.link("status").stdout
    assert status.startswith("not installed\n")
    assert "a notebook here gets merge=unspecified (not link-ipynb)" in status


def test_install_to_gitattributes_and_global_and_nbdime_is_named(repo):
    repo.git("config", "merge.jupyternotebook.driver", "git-nbmergedriver merge %O %A %B %L %P")
    (repo.path / ".gitattributes").write_text("*.ipynb filter=nbstripout\n")
    done = repo.link("install", "--attributes-file")
    assert done.returncode == 0, done.stderr
    assert "note: nbdime is configured too (merge.jupyternotebook.driver)" in done.stdout
    assert "note: nbstripout is configured too" in done.stdout
    assert (repo.path / ".gitattributes").read_text().endswith("*.ipynb merge=link-ipynb diff=link-ipynb\n")
    done = repo.link("install", "--global")
    assert done.returncode == 0, done.stderr
    home = Path(repo.env["HOME"])
    assert "link-ipynb" in (home / "gitconfig").read_text()
    assert "merge=link-ipynb" in (home / ".config" / "git" / "attributes").read_text()
    assert repo.link("uninstall", "--global").returncode == 0
    assert "link-ipynb" not in (home / "gitconfig").read_text()


def test_outside_a_repository_install_is_a_clear_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(PYTHONPATH=str(ROOT), GIT_CEILING_DIRECTORIES=str(tmp_path), HOME=str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "link_kernel.cli", "git", "install"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert "GitSetupError" in done.stderr and "hint:" in done.stderr
