"""Files travel between the notebook folder and each host's work directory.

Through the installed kernelspec, on a process host and on an ssh host.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from kernel_client import start_client


def notebook_dir(client) -> Path:
    return Path(eval(client.run("import os; os.getcwd()").result))


def test_a_remotely_written_checkpoint_appears_locally(link_remote, remote):
    here = notebook_dir(link_remote)
    result = link_remote.run(
        f"# link: {remote}\nimport os, pickle\nos.makedirs('ckpt', exist_ok=True)\n"
        "with open('ckpt/model.pkl', 'wb') as f:\n    pickle.dump({'epoch': 3}, f)\n"
        "os.chmod('ckpt/model.pkl', 0o640)"
    )
    assert result.status == "ok", result.text
    checkpoint = here / "ckpt" / "model.pkl"
    assert checkpoint.exists()
    assert link_remote.run("import pickle; pickle.load(open('ckpt/model.pkl', 'rb'))").result == "{'epoch': 3}"
    assert oct(checkpoint.stat().st_mode & 0o777) == oct(0o640)


def test_a_local_edit_is_seen_by_the_next_remote_cell(link_remote, remote):
    here = notebook_dir(link_remote)
    (here / "data.csv").write_text("a,b\n1,2\n")
    first = link_remote.run(f"# link: {remote}\nopen('data.csv').read()")
    assert first.result == repr("a,b\n1,2\n")
    (here / "data.csv").write_text("a,b\n3,4\n")
    past = time.time() - 3600
    os.utime(here / "data.csv", (past, past))
    second = link_remote.run(f"# link: {remote}\nimport os\n(open('data.csv').read(), int(os.path.getmtime('data.csv')))")
    assert eval(second.result) == ("a,b\n3,4\n", int(past))


def test_a_conflict_keeps_both_versions(link_remote, remote):
    here = notebook_dir(link_remote)
    (here / "notes.txt").write_text("v1\n")
    link_remote.run(f"# link: {remote}\nopen('notes.txt').read()")
    # the host's copy changes in a cell that also waits for the local edit
    (here / "go").write_text("")
    (here / "notes.txt").write_text("local edit\n")
    result = link_remote.run(f"# link: {remote} files=off\nopen('notes.txt', 'w').write('host edit\\n')")
    assert result.status == "ok"
    synced = link_remote.run(f"%link sync {remote}")
    assert synced.status == "ok"
    assert (here / "notes.txt").read_text() == "local edit\n"
    saved = here / f"notes.from-{remote}.txt"
    assert saved.read_text() == "host edit\n"
    assert f"notes.txt changed here and on {remote}" in synced.stderr


def test_deletes_propagate_both_ways(link_remote, remote):
    here = notebook_dir(link_remote)
    (here / "gone-local.txt").write_text("x")
    (here / "gone-remote.txt").write_text("y")
    link_remote.run(f"# link: {remote}\nimport os\nsorted(f for f in os.listdir('.') if f.startswith('gone'))")
    (here / "gone-local.txt").unlink()
    result = link_remote.run(f"# link: {remote}\nimport os\nos.remove('gone-remote.txt')\nos.path.exists('gone-local.txt')")
    assert result.result == "False"
    assert not (here / "gone-remote.txt").exists()


def test_ignored_files_never_move(link_remote, remote):
    here = notebook_dir(link_remote)
    (here / ".linkignore").write_text("secret.txt\nscratch/\n")
    (here / "secret.txt").write_text("local only")
    (here / "scratch").mkdir(exist_ok=True)
    (here / "scratch" / "big.bin").write_bytes(b"0" * 100)
    (here / ".venv").mkdir(exist_ok=True)
    (here / ".venv" / "pyvenv.cfg").write_text("home = /usr\n")
    result = link_remote.run(
        f"# link: {remote}\nimport os\n"
        "seen = [os.path.exists(p) for p in ('secret.txt', 'scratch/big.bin', '.venv/pyvenv.cfg')]\n"
        "os.makedirs('scratch', exist_ok=True)\nopen('scratch/made-remotely', 'w').write('r')\n"
        "open('secret.txt', 'w').write('host version')\nseen"
    )
    assert result.result == "[False, False, False]"
    assert (here / "secret.txt").read_text() == "local only"
    assert not (here / "scratch" / "made-remotely").exists()


def test_names_with_spaces_and_non_ascii_characters(link_remote, remote):
    here = notebook_dir(link_remote)
    (here / "my data ünïcödé 数据.txt").write_text("hello")
    result = link_remote.run(
        f"# link: {remote}\ntext = open('my data ünïcödé 数据.txt').read()\n"
        "open('résultat final 🎉.txt', 'w').write(text.upper())"
    )
    assert result.status == "ok", result.text
    assert (here / "résultat final 🎉.txt").read_text() == "HELLO"


def test_ten_thousand_small_files_sync_correctly(link_remote, remote):
    here = notebook_dir(link_remote)
    many = here / "many"
    for i in range(100):
        d = many / f"d{i:02d}"
        d.mkdir(parents=True, exist_ok=True)
        for j in range(100):
            (d / f"f{j:02d}.txt").write_text(f"{i}-{j}")
    count = link_remote.run(
        f"# link: {remote}\nimport os\n"
        "names = [os.path.join(r, f) for r, _, fs in os.walk('many') for f in fs]\n"
        "bad = [n for n in names if open(n).read() != '-'.join(str(int(p[1:])) for p in n[:-4].split('/')[1:])]\n"
        "open('many/d00/f00.txt', 'w').write('changed on the host')\n"
        "(len(names), len(bad))",
        timeout=300,
    )
    assert count.result == "(10000, 0)", count.text
    assert (many / "d00" / "f00.txt").read_text() == "changed on the host"


def test_a_file_the_cell_left_open_comes_back_whole(link_remote, remote):
    here = notebook_dir(link_remote)
    result = link_remote.run(f"# link: {remote}\nlog = open('left-open.log', 'w')\nlog.write('all of it\\n')")
    assert result.status == "ok", result.text
    assert (here / "left-open.log").read_text() == "all of it\n"


def test_a_folder_too_big_to_sync_says_so_and_cells_still_run(remote, tmp_path):
    """A notebook opened in a huge folder (a home directory, /tmp) is not synced."""
    profile = tmp_path / "ipython" / "profile_default"
    profile.mkdir(parents=True)
    (profile / "link_kernel_config.py").write_text("c.LinkKernel.sync_max_files = 20\n")
    folder = tmp_path / "notebook"
    for i in range(21):
        (folder / "many").mkdir(parents=True, exist_ok=True)
        (folder / "many" / f"{i}.txt").write_text(str(i))
    client = start_client("link", cwd=str(folder), env={"IPYTHONDIR": str(tmp_path / "ipython")})
    try:
        first = client.run(f"# link: {remote}\nopen('made.txt', 'w').write('x')\n6 * 7")
        assert first.result == "42", first.text
        assert "files are not synced" in first.stderr and "more than 20 files" in first.stderr
        assert not (folder / "made.txt").exists()  # it stayed on the host
        second = client.run(f"# link: {remote}\n1")
        assert "files are not synced" not in second.stderr  # said once
        sync = client.run(f"%link sync {remote}")
        assert sync.error and sync.error["ename"] == "FileSyncError", sync.text
        assert "too big" in sync.error["evalue"]
    finally:
        client.shutdown()


def _folder_state(root: Path) -> dict:
    import hashlib

    return {
        p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns,
                                         p.stat().st_mode & 0o777)
        for p in root.rglob("*") if p.is_file()
    }


def test_a_new_folder_of_many_files_arrives_whole_to_the_nanosecond(link_remote, remote):
    """Many small files travel in one bundle (a channel of the connection, then an
    OpenSSH client once they add up to 48 MiB); what the host has is what the notebook has."""
    import random

    here = notebook_dir(link_remote)
    rng = random.Random(3)
    measure = ("# link: {remote}\nimport hashlib, os\nfrom pathlib import Path\n"
               "{{p.relative_to('{folder}').as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), "
               "p.stat().st_mtime_ns, p.stat().st_mode & 0o777) "
               "for p in Path('{folder}').rglob('*') if p.is_file()}}")
    for folder, count, size in (("small", 60, 3000), ("images", 52, 2**20)):
        for i in range(count):
            path = here / folder / f"part{i % 5}" / f"{i:03}.bin"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(rng.randbytes(size - i))
            path.chmod(0o600 if i % 3 else 0o750)
            os.utime(path, ns=(1_700_000_000_123_456_789 + i * 1_001, 1_700_000_000_123_456_789 + i * 1_001))
        result = link_remote.run(measure.format(remote=remote, folder=folder), timeout=300)
        assert result.status == "ok", result.text
        assert eval(result.result) == _folder_state(here / folder)
