"""The pipeline cache (link_kernel.pipeline.cache) on real files: index, blobs, LRU, restarts.

Blobs are made by the agent itself, as the variable sync makes them, in a tmp store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from link_kernel import agent
from link_kernel.pipeline.cache import INDEX_NAME, Cache, Entry
from link_kernel.pipeline.units import format_age

MiB = 2**20


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float = 1.0) -> float:
        self.now += seconds
        return self.now


@pytest.fixture
def store(tmp_path) -> Path:
    return tmp_path / "cache" / "link-kernel" / "blobs"


@pytest.fixture
def clock() -> Clock:
    return Clock()


def blob(store: Path, value) -> dict:
    """The manifest entry the agent gives for ``value`` (inline when small)."""
    blob_id, parts = agent.blob_of(value, "sha256")
    return agent.describe(value, blob_id, parts, str(store))


def big(store: Path, seed: int, mib: int = 1) -> dict:
    entry = blob(store, np.random.default_rng(seed).random(mib * MiB // 8))
    assert "inline" not in entry
    return entry


def restore(store: Path, entry: Entry) -> dict:
    return {name: agent.read_blob(str(store), blob_id) for name, blob_id in entry.outputs.items()}


def test_an_entry_is_kept_and_restored(store, clock):
    cache = Cache(store, clock=clock)
    df = big(store, 1)
    entry = cache.put("k1", "load", {"df": df, "n": blob(store, 42)}, seconds=41.5, target="gpu",
                      modules={"np": "numpy"}, deleted=["tmp"])
    assert entry is not None
    assert "k1" in cache and "k2" not in cache and 3 not in cache
    got = cache.get("k1")
    assert (got.component, got.seconds, got.target, got.hits) == ("load", 41.5, "gpu", 0)
    assert (got.modules, got.deleted) == ({"np": "numpy"}, ["tmp"])
    assert got.outputs["df"] == df["id"]
    assert got.size == (store / df["id"]).stat().st_size + (store / got.outputs["n"]).stat().st_size
    values = restore(store, got)
    assert values["n"] == 42
    assert np.array_equal(values["df"], np.random.default_rng(1).random(MiB // 8))


def test_a_small_value_that_travelled_inline_becomes_a_blob_file(store, clock):
    small = blob(store, {"rows": 3})
    assert "inline" in small and not (store / small["id"]).exists()
    Cache(store, clock=clock).put("k", "load", {"meta": small})
    assert (store / small["id"]).exists()
    assert agent.read_blob(str(store), small["id"]) == {"rows": 3}


def test_a_hit_counts_and_moves_the_last_use(store, clock):
    cache = Cache(store, clock=clock)
    cache.put("k", "load", {"df": big(store, 1)})
    created = clock()
    clock.tick(60)
    entry = cache.hit("k")
    assert (entry.hits, entry.created, entry.used) == (1, created, clock())
    assert cache.hit("k").hits == 2
    assert cache.get("k").hits == 2, "get() does not count"
    assert cache.hit("missing") is None
    assert os.path.getmtime(store / entry.outputs["df"]) == clock(), "the store's LRU sees it too"


def test_the_cache_survives_a_restart_in_another_process(store, clock):
    df = big(store, 7)
    script = textwrap.dedent(
        f"""
        from link_kernel.pipeline.cache import Cache
        Cache({str(store)!r}).put("key-7", "train", {{"model": {df['id']!r}}}, seconds=3.0)
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    cache = Cache(store, clock=clock)
    assert "key-7" in cache
    assert cache.get("key-7").component == "train"
    assert (store.parent / INDEX_NAME).exists(), "the index sits beside the store"


def test_an_entry_whose_blob_is_gone_is_a_miss(store, clock):
    cache = Cache(store, clock=clock)
    df = big(store, 1)
    cache.put("k", "load", {"df": df})
    (store / df["id"]).unlink()  # the store trimmed itself
    assert "k" not in cache
    assert cache.entries() == [], "the record is dropped"


def test_an_unchecked_blob_counts(store, clock):
    df = big(store, 1)
    os.replace(store / df["id"], store / (df["id"] + agent.UNCHECKED))  # as a transfer lands it
    cache = Cache(store, clock=clock)
    assert cache.put("k", "load", {"df": df}) is not None
    assert "k" in cache


def test_a_put_of_a_missing_blob_keeps_nothing(store, clock):
    cache = Cache(store, clock=clock)
    assert cache.put("k", "load", {"df": "sha256-" + "0" * 64}) is None
    assert "k" not in cache


def test_least_recently_used_entries_are_evicted_to_the_limit(store, clock):
    cache = Cache(store, limit=int(2.5 * MiB), clock=clock)
    a, b, c = big(store, 1), big(store, 2), big(store, 3)
    cache.put("ka", "a", {"x": a})
    clock.tick()
    cache.put("kb", "b", {"x": b})
    clock.tick()
    cache.hit("ka")  # a is now more recent than b
    clock.tick()
    cache.put("kc", "c", {"x": c})
    assert [e.component for e in cache.entries()] == ["c", "a"]
    assert not (store / b["id"]).exists(), "the evicted entry's blob is deleted"
    assert (store / a["id"]).exists() and (store / c["id"]).exists()
    assert cache.size <= cache.limit


def test_a_blob_two_entries_share_counts_once_and_stays_while_one_holds_it(store, clock):
    cache = Cache(store, limit=int(1.5 * MiB), clock=clock)
    shared = big(store, 1)
    cache.put("k1", "load", {"df": shared})
    clock.tick()
    cache.put("k2", "clean", {"df": shared, "n": blob(store, 1)})
    assert len(cache.entries()) == 2, "the shared MiB is counted once, under the limit"
    assert cache.size < 1.1 * MiB
    cache.clear("load")
    assert (store / shared["id"]).exists(), "clean still holds it"
    assert "k2" in cache
    cache.clear("clean")
    assert not (store / shared["id"]).exists()


def test_evicting_an_entry_frees_nothing_of_a_blob_another_entry_still_holds(store, clock):
    cache = Cache(store, limit=int(2.5 * MiB), clock=clock)
    a, b, c = big(store, 1), big(store, 2), big(store, 3)
    cache.put("k1", "load", {"x": a})
    clock.tick()
    cache.put("k2", "clean", {"x": a, "y": b})
    clock.tick()
    cache.put("k3", "train", {"x": c})
    assert [e.key for e in cache.entries()] == ["k3"], "dropping k1 alone freed nothing"
    assert cache.size <= cache.limit


def test_a_blob_the_variable_sync_used_later_is_left_to_the_store(store, clock):
    cache = Cache(store, clock=clock)
    df = big(store, 1)
    cache.put("k", "load", {"df": df})
    later = clock() + 3600
    os.utime(store / df["id"], (later, later))  # an export wrote (touched) it since
    cache.clear()
    assert cache.entries() == []
    assert (store / df["id"]).exists()


def test_an_entry_over_the_limit_is_not_kept(store, clock):
    cache = Cache(store, limit=MiB // 2, clock=clock)
    assert cache.put("k", "load", {"df": big(store, 1)}) is None
    assert cache.entries() == []
    with pytest.raises(ValueError, match="at least 0"):
        Cache(store, limit=-1)


def test_clear_one_component_or_all(store, clock):
    cache = Cache(store, clock=clock)
    a, b = big(store, 1), big(store, 2)
    cache.put("k1", "load", {"x": a})
    cache.put("k2", "train", {"x": b})
    cache.put("k3", "train", {"x": blob(store, 5)})
    dropped = cache.clear("train")
    assert sorted(e.key for e in dropped) == ["k2", "k3"]
    assert [e.key for e in cache.entries()] == ["k1"]
    assert not (store / b["id"]).exists() and (store / a["id"]).exists()
    assert cache.clear("nothing") == []
    assert [e.key for e in cache.clear()] == ["k1"]
    assert not (store / a["id"]).exists()
    assert cache.entries() == []


def test_putting_a_key_again_keeps_its_hits(store, clock):
    cache = Cache(store, clock=clock)
    cache.put("k", "load", {"x": blob(store, 1)})
    cache.hit("k")
    cache.put("k", "load", {"x": blob(store, 1)}, seconds=2.0)
    assert cache.get("k").hits == 1 and cache.get("k").seconds == 2.0
    assert len(cache.entries()) == 1


def test_the_listing_shows_component_size_age_and_hits(store, clock):
    cache = Cache(store, limit=2**30, clock=clock)
    assert cache.listing() == "the pipeline cache is empty"
    cache.put("k1", "load", {"df": big(store, 1, mib=2)})
    clock.tick(7200)
    cache.put("k2", "train", {"n": blob(store, 3)})
    clock.tick(30)
    cache.hit("k1")
    lines = cache.listing().splitlines()
    assert lines[0].split() == ["component", "size", "age", "hits"]
    assert lines[1].split() == ["load", "2.0", "MiB", "2", "h", "1"]
    assert lines[2].split()[0] == "train" and lines[2].split()[-3:] == ["30", "s", "0"]
    assert lines[3].startswith("2 entries, 2.0 MiB (limit 1.0 GiB)")
    assert cache.listing("train").splitlines()[1].split()[0] == "train"
    assert cache.listing("none") == "no cache entries for 'none'"


@pytest.mark.parametrize(("seconds", "text"), [(0, "0 s"), (59, "59 s"), (60, "1 min"), (3599, "59 min"), (3600, "1 h"), (86400 * 3, "3 d"), (-5, "0 s")])
def test_ages(seconds, text):
    assert format_age(seconds) == text


@pytest.mark.parametrize("damage", ["{not json", '{"format": 99, "entries": {}}', '{"format": 1, "entries": {"k": {"bogus": 1}}}', "[]", ""])
def test_a_damaged_index_is_set_aside_and_the_cache_starts_empty(store, clock, damage):
    index = store.parent / INDEX_NAME
    index.parent.mkdir(parents=True)
    index.write_text(damage)
    cache = Cache(store, clock=clock)
    assert cache.entries() == []
    assert (store.parent / (INDEX_NAME + ".damaged")).read_text() == damage
    assert cache.put("k", "load", {"x": blob(store, 1)}) is not None
    assert "k" in Cache(store, clock=clock)


def test_the_index_is_written_whole_and_private(store, clock):
    cache = Cache(store, clock=clock)
    cache.put("k", "load", {"x": blob(store, 1)})
    index = store.parent / INDEX_NAME
    data = json.loads(index.read_text())
    assert data["format"] == 1 and list(data["entries"]) == ["k"]
    assert oct(index.stat().st_mode & 0o777) == "0o600"
    assert not [p for p in index.parent.iterdir() if p.name.endswith(".tmp")]


def test_two_kernels_putting_at_once_lose_no_entry(store):
    script = textwrap.dedent(
        f"""
        import sys
        from link_kernel import agent
        from link_kernel.pipeline.cache import Cache
        cache = Cache({str(store)!r})
        for i in range(25):
            entry = agent.describe(i, *agent.blob_of((sys.argv[1], i), "sha256"), {str(store)!r})
            cache.put(f"{{sys.argv[1]}}-{{i}}", sys.argv[1], {{"x": entry}})
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", script, who], env=env) for who in ("a", "b")]
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    keys = {e.key for e in Cache(store).entries()}
    assert keys == {f"{who}-{i}" for who in "ab" for i in range(25)}


# -- properties ----------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, 5), st.lists(st.integers(0, 6), min_size=1, max_size=3)),
        st.tuples(st.just("hit"), st.integers(0, 5), st.just([])),
        st.tuples(st.just("clear"), st.integers(0, 5), st.just([])),
    ),
    max_size=25,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(_OPS)
def test_any_sequence_keeps_the_limit_and_every_kept_entry_whole(tmp_path_factory, ops):
    store = tmp_path_factory.mktemp("prop") / "blobs"
    clock = Clock()
    values = [bytes([i]) * (100_000 + i) for i in range(7)]  # blobs over the inline size
    ids = [blob(store, v)["id"] for v in values]
    cache = Cache(store, limit=350_000, clock=clock)
    for op, key, blobs in ops:
        clock.tick()
        if op == "put":
            cache.put(f"k{key}", f"c{key % 3}", {f"v{i}": ids[b] for i, b in enumerate(blobs)})
        elif op == "hit":
            cache.hit(f"k{key}")
        else:
            cache.clear(f"c{key % 3}")
        assert cache.size <= cache.limit
        for entry in cache.entries():
            assert entry.key in cache, "no kept entry lost a blob"
            for name, blob_id in entry.outputs.items():
                assert agent.read_blob(str(store), blob_id) == values[ids.index(blob_id)]


def test_adopt_adds_entries_made_elsewhere_and_never_overwrites_one(tmp_path):
    from link_kernel.agent import write_blob
    from link_kernel.pipeline.cache import Entry

    store = tmp_path / "blobs"
    cache = Cache(store, clock=lambda: 500.0)
    mine, _ = write_blob(str(store), [1, 2], "sha256")
    theirs, _ = write_blob(str(store), [3, 4], "sha256")
    assert cache.put("k1", "load", {"rows": mine}) is not None
    before = cache.get("k1")
    incoming = [
        Entry(key="k1", component="load", outputs={"rows": theirs}, created=1.0, used=2.0, hits=7),
        Entry(key="k2", component="clean", outputs={"rows": theirs}, created=1.0, used=2.0, hits=7),
        Entry(key="k3", component="gone", outputs={"rows": "sha256-" + "0" * 64}),
    ]
    adopted, left = cache.adopt(incoming)
    assert [e.key for e in adopted] == ["k2"] and [e.key for e in left] == ["k1", "k3"]
    assert cache.get("k1") == before, "an existing entry is kept as it is"
    got = cache.get("k2")
    assert (got.outputs, got.created, got.used, got.hits) == ({"rows": theirs}, 1.0, 500.0, 0)
    assert "k3" not in cache
