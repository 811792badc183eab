"""Registering the notebook merge driver and diff with git: install, uninstall, status.

Two settings and one attributes line (see ``gitattributes(5)``)::

    merge.link-ipynb.driver   = PYTHON -m link_kernel.cli git merge-driver %O %A %B %P
    diff.link-ipynb.textconv  = PYTHON -m link_kernel.cli git textconv
    *.ipynb merge=link-ipynb diff=link-ipynb

PYTHON is this interpreter's absolute path: git runs drivers outside any activated
environment. The settings go to the repository's config (or ``--global``); the line goes
to ``.git/info/attributes`` (only this clone), or ``.gitattributes`` (shared, committed)
when asked, or the global attributes file with ``--global``. Every git call is an argv
list, never a shell string.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import GitSetupError

DRIVER = "link-ipynb"
LINE = f"*.ipynb merge={DRIVER} diff={DRIVER}"
COMMENT = "# link-kernel: notebooks merge and diff cell by cell (link-kernel git install)"
#: Other tools' notebook drivers and filters, as their settings and attributes name them.
OTHERS = {"nbdime": ("nbdime", "jupyternotebook"), "nbstripout": ("nbstripout",)}


@dataclass
class Status:
    """What is installed where."""

    settings: dict[str, str] = field(default_factory=dict)
    attributes: list[Path] = field(default_factory=list)
    others: list[str] = field(default_factory=list)
    #: ``{"merge": driver, "diff": driver}`` that git applies to a notebook here (in a repository).
    effective: dict[str, str] = field(default_factory=dict)

    @property
    def installed(self) -> bool:
        return bool(self.settings) and bool(self.attributes)


def _git(args: list[str], cwd: Path, *, check: bool = True) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        msg = "git is not on PATH"
        raise GitSetupError(msg) from exc
    if check and done.returncode != 0:
        msg = f"'git {' '.join(args)}' failed: {done.stderr.strip()}"
        raise GitSetupError(msg)
    return done


def commands(python: str | None = None) -> dict[str, str]:
    """The git settings, for the interpreter ``python`` (default: this one)."""
    exe = shlex.quote(os.path.abspath(python or sys.executable))
    return {
        f"merge.{DRIVER}.name": "Link notebooks, merged cell by cell",
        f"merge.{DRIVER}.driver": f"{exe} -m link_kernel.cli git merge-driver %O %A %B %P",
        f"diff.{DRIVER}.textconv": f"{exe} -m link_kernel.cli git textconv",
    }


def attributes_file(cwd: Path, *, global_: bool, shared: bool) -> Path:
    """Where the attributes line goes (see the module docstring)."""
    if global_:
        done = _git(["config", "--global", "--path", "--get", "core.attributesFile"], cwd, check=False)
        if done.returncode == 0 and done.stdout.strip():
            return Path(done.stdout.strip()).expanduser()
        config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        return Path(config_home) / "git" / "attributes"
    if shared:
        return Path(_git(["rev-parse", "--show-toplevel"], cwd).stdout.strip()) / ".gitattributes"
    path = Path(_git(["rev-parse", "--git-path", "info/attributes"], cwd).stdout.strip())
    return path if path.is_absolute() else cwd / path


def install(cwd: Path, *, global_: bool = False, shared: bool = False) -> tuple[Path, list[str]]:
    """Write the settings and the attributes line; return the attributes file and notes
    on other notebook tools already configured."""
    scope = ["--global"] if global_ else []
    if not global_:
        _git(["rev-parse", "--git-dir"], cwd)
    for key, value in commands().items():
        _git(["config", *scope, key, value], cwd)
    path = attributes_file(cwd, global_=global_, shared=shared)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    lines = text.splitlines()
    if LINE not in (line.strip() for line in lines):
        # last, so it wins over earlier *.ipynb lines of the same file
        addition = f"{COMMENT}\n{LINE}\n"
        path.write_text(text + ("" if not text or text.endswith("\n") else "\n") + addition,
                        encoding="utf-8")
    return path, others(cwd)


def uninstall(cwd: Path, *, global_: bool = False) -> list[Path]:
    """Remove the settings and every attributes line this module wrote; return the files
    whose line was removed."""
    scope = ["--global"] if global_ else []
    for section in (f"merge.{DRIVER}", f"diff.{DRIVER}"):
        _git(["config", *scope, "--remove-section", section], cwd, check=False)
    changed = []
    for path in _candidate_files(cwd, global_=global_):
        if not path.exists():
            continue
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if line.strip() not in (LINE, COMMENT)]
        if kept != lines:
            path.write_text("".join(kept), encoding="utf-8")
            changed.append(path)
    return changed


def status(cwd: Path) -> Status:
    """The settings in effect here and the attributes files that hold the line."""
    result = Status()
    for key in commands():
        done = _git(["config", "--get", key], cwd, check=False)
        if done.returncode == 0:
            result.settings[key] = done.stdout.strip()
    for path in _candidate_files(cwd, global_=True) + _candidate_files(cwd, global_=False):
        if path.exists() and LINE in (line.strip() for line in path.read_text(encoding="utf-8").splitlines()):
            result.attributes.append(path)
    result.others = others(cwd)
    done = _git(["check-attr", "merge", "diff", "--", "notebook.ipynb"], cwd, check=False)
    if done.returncode == 0:
        for line in done.stdout.splitlines():
            _, attribute, value = (part.strip() for part in line.split(":", 2))
            result.effective[attribute] = value
    return result


def others(cwd: Path) -> list[str]:
    """Notes on nbdime's and nbstripout's settings or attributes, if any are there."""
    notes = []
    done = _git(["config", "--get-regexp", r"^(merge|diff|filter)\."], cwd, check=False)
    settings = done.stdout.splitlines() if done.returncode == 0 else []
    files = [p for p in _candidate_files(cwd, global_=True) + _candidate_files(cwd, global_=False) if p.exists()]
    for tool, words in OTHERS.items():
        found = [line.split()[0] for line in settings if any(w in line for w in words)]
        for path in files:
            for line in path.read_text(encoding="utf-8").splitlines():
                if any(w in line for w in words) and not line.lstrip().startswith("#"):
                    found.append(f"{path}: {line.strip()}")
        if found:
            notes.append(
                f"{tool} is configured too ({'; '.join(found)}): for *.ipynb, the last matching "
                "attributes line wins, and .git/info/attributes wins over .gitattributes"
            )
    return notes


def _candidate_files(cwd: Path, *, global_: bool) -> list[Path]:
    if global_:
        return [attributes_file(cwd, global_=True, shared=False)]
    if _git(["rev-parse", "--git-dir"], cwd, check=False).returncode != 0:
        return []
    return [
        attributes_file(cwd, global_=False, shared=False),
        attributes_file(cwd, global_=False, shared=True),
    ]
