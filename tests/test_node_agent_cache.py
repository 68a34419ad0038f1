"""AdapterCache on a real folder: atomic commits, LRU eviction by bytes, recovery, safe names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraplane.operator.node_agent.cache import (
    META_FILE,
    PARTIAL,
    AdapterCache,
    CapacityError,
    check_key,
)


def _download(cache: AdapterCache, size: int) -> Path:
    partial = cache.new_partial()
    (partial / "adapter_model.safetensors").write_bytes(b"x" * size)
    (partial / "adapter_config.json").write_text("{}")
    return partial


def _put(cache: AdapterCache, name: str, size: int, version: str = "abcdef") -> None:
    cache.commit(("ns", name, version), _download(cache, size), size, "0" * 64)


def test_commit_is_atomic_and_visible_only_when_complete(tmp_path: Path) -> None:
    cache = AdapterCache(tmp_path, 1000)
    partial = _download(cache, 10)
    assert not (tmp_path / "ns").exists()  # engines see nothing during the download
    entry, evicted = cache.commit(("ns", "a", "abcdef"), partial, 10, "0" * 64)
    assert evicted == [] and not partial.exists()
    folder = tmp_path / "ns" / "a" / "abcdef"
    assert entry.path == str(folder)
    assert json.loads((folder / META_FILE).read_text())["bytes"] == 10
    assert cache.used_bytes == 10


def test_lru_eviction_by_bytes(tmp_path: Path) -> None:
    cache = AdapterCache(tmp_path, 100)
    for name in ("a", "b", "c"):
        _put(cache, name, 40)  # c evicts a
    assert [e.name for e in cache.entries()] == ["b", "c"]
    cache.touch(("ns", "b", "abcdef"))  # b is now the most recent
    partial = _download(cache, 40)
    _, evicted = cache.commit(("ns", "d", "abcdef"), partial, 40, "0" * 64)
    assert [e.name for e in evicted] == ["c"]
    assert not (tmp_path / "ns" / "c").exists()
    assert [e.name for e in cache.entries()] == ["b", "d"] and cache.used_bytes == 80


def test_too_large_for_the_node_is_refused_and_cleaned(tmp_path: Path) -> None:
    cache = AdapterCache(tmp_path, 100)
    _put(cache, "a", 50)
    partial = _download(cache, 101)
    with pytest.raises(CapacityError):
        cache.commit(("ns", "big", "abcdef"), partial, 101, "0" * 64)
    assert not partial.exists() and [e.name for e in cache.entries()] == ["a"]


def test_recover_rebuilds_index_and_removes_debris(tmp_path: Path) -> None:
    cache = AdapterCache(tmp_path, 1000)
    _put(cache, "a", 10)
    _put(cache, "b", 20, version="123456")
    _download(cache, 5)  # a crash mid-download
    no_meta = tmp_path / "ns" / "c" / "abcdef"
    no_meta.mkdir(parents=True)  # a crash between rename and... (cannot happen) or tampering
    (tmp_path / "ns" / "bad name" / "abcdef").mkdir(parents=True)
    again = AdapterCache(tmp_path, 1000)
    entries, removed = again.recover()
    assert sorted(e.name for e in entries) == ["a", "b"] and again.used_bytes == 30
    assert removed == 3
    assert not (tmp_path / PARTIAL).exists() and not no_meta.exists()


def test_evict_one_version_or_all(tmp_path: Path) -> None:
    cache = AdapterCache(tmp_path, 1000)
    _put(cache, "a", 10, version="aaaaaa")
    _put(cache, "a", 10, version="bbbbbb")
    assert [e.version for e in cache.evict("ns", "a", "aaaaaa")] == ["aaaaaa"]
    assert [e.version for e in cache.evict("ns", "a")] == ["bbbbbb"]
    assert cache.entries() == [] and not (tmp_path / "ns").exists()


@pytest.mark.parametrize("key", [("..", "a", "abcdef"), ("ns", "a/b", "abcdef"),
                                 ("ns", "A", "abcdef"), ("ns", "a", "../../x"),
                                 ("ns", "a", "xyz123"), ("", "a", "abcdef")])
def test_names_that_could_escape_the_folder_are_refused(key: tuple[str, str, str]) -> None:
    with pytest.raises(ValueError):
        check_key(*key)
