"""Every edit of a file reaches the other side, however small and however soon.

A notebook that rewrites ``data.csv`` between remote cells (same size, within the
same second: a parameter sweep, a config written by a cell) must never compute on
the old content. Through the installed kernelspec, on a process host and on an
ssh host.
"""

from __future__ import annotations

from pathlib import Path

EDITS = 20


def notebook_dir(client) -> Path:
    return Path(eval(client.run("import os; os.getcwd()").result))


def csv(i: int) -> str:
    """The content of edit ``i``: the same size for every i < 90."""
    return f"a,b\n{i + 10},{i + 10}\n"


def test_every_same_size_local_edit_reaches_the_next_remote_cell(link_remote, remote):
    here = notebook_dir(link_remote)
    link_remote.run("import pandas as pd")
    seen = []
    for i in range(EDITS):
        value = i + 10
        if i % 3 == 0:  # a local cell writes it with open()
            wrote = link_remote.run(f"with open('data.csv', 'w') as f:\n    f.write({csv(i)!r})")
            assert wrote.status == "ok", wrote.text
        elif i % 3 == 1:  # a local cell writes it with pandas
            code = f"pd.DataFrame({{'a': [{value}], 'b': [{value}]}}).to_csv('data.csv', index=False)"
            wrote = link_remote.run(code)
            assert wrote.status == "ok", wrote.text
        else:  # something outside the kernel writes it (an editor, a script)
            (here / "data.csv").write_text(csv(i))
        read = link_remote.run(f"# link: {remote}\nopen('data.csv').read()")
        assert read.status == "ok", read.text
        seen.append(eval(read.result))
    assert seen == [csv(i) for i in range(EDITS)]


def test_every_same_size_remote_edit_reaches_the_next_local_cell(link_remote, remote):
    here = notebook_dir(link_remote)
    (here / "data.csv").write_text(csv(0))
    seen = []
    for i in range(1, EDITS + 1):
        wrote = link_remote.run(
            f"# link: {remote}\nimport pandas as pd\nassert len(open('data.csv').read()) == {len(csv(0))}\n"
            f"pd.DataFrame({{'a': [{i + 10}], 'b': [{i + 10}]}}).to_csv('data.csv', index=False)"
        )
        assert wrote.status == "ok", wrote.text
        seen.append(eval(link_remote.run("open('data.csv').read()").result))
    assert seen == [csv(i) for i in range(1, EDITS + 1)]
    assert (here / "data.csv").read_text() == csv(EDITS)


def test_a_same_size_edit_on_both_sides_keeps_both(link_remote, remote):
    here = notebook_dir(link_remote)
    (here / "both.txt").write_text("v1\n")
    assert link_remote.run(f"# link: {remote}\nopen('both.txt').read()").result == repr("v1\n")
    for i in range(3):  # each round: the host and the notebook both change it, same size
        host, local = f"h{i}\n", f"l{i}\n"
        result = link_remote.run(f"# link: {remote} files=off\nopen('both.txt', 'w').write({host!r})")
        assert result.status == "ok", result.text
        (here / "both.txt").write_text(local)
        synced = link_remote.run(f"%link sync {remote}")
        assert synced.status == "ok", synced.text
        assert (here / "both.txt").read_text() == local
        saved = here / (f"both.from-{remote}.txt" if i == 0 else f"both.from-{remote}-{i + 1}.txt")
        assert saved.read_text() == host, sorted(p.name for p in here.iterdir())
        assert f"both.txt changed here and on {remote}" in synced.stderr
        # the next remote cell sees the local version
        assert link_remote.run(f"# link: {remote}\nopen('both.txt').read()").result == repr(local)


def test_edits_that_alternate_between_local_and_remote_cells(link_remote, remote):
    """A notebook that hands one file back and forth: each side sees the other's edit,
    and no edit is taken for a conflict."""
    here = notebook_dir(link_remote)
    for i in range(0, EDITS, 2):
        wrote = link_remote.run(f"open('ping.csv', 'w').write({csv(i)!r})")
        assert wrote.status == "ok", wrote.text
        there = link_remote.run(
            f"# link: {remote}\nseen = open('ping.csv').read()\nopen('ping.csv', 'w').write({csv(i + 1)!r})\nseen"
        )
        assert there.status == "ok", there.text
        assert eval(there.result) == csv(i)
        assert "changed here and on" not in there.stderr, there.stderr
        assert eval(link_remote.run("open('ping.csv').read()").result) == csv(i + 1)
    assert not list(here.glob("ping.from-*"))


def test_a_rewrite_that_keeps_size_and_mtime_on_the_host_comes_back(link_remote, remote):
    """As on a host whose file system keeps coarse times: the cell's rewrite leaves the
    size and the mtime as they were pushed. The host's scan hashes such racy files."""
    here = notebook_dir(link_remote)
    for i in range(0, 10, 2):
        (here / "coarse.csv").write_text(csv(i))
        there = link_remote.run(
            f"# link: {remote}\nimport os\nst = os.stat('coarse.csv')\nseen = open('coarse.csv').read()\n"
            f"open('coarse.csv', 'w').write({csv(i + 1)!r})\n"
            "os.utime('coarse.csv', ns=(st.st_atime_ns, st.st_mtime_ns))\nseen"
        )
        assert there.status == "ok", there.text
        assert eval(there.result) == csv(i)
        assert eval(link_remote.run("open('coarse.csv').read()").result) == csv(i + 1)
