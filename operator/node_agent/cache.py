"""Adapters in a tmpfs folder: byte capacity, LRU eviction, atomic commits, recovery on restart.

Layout: ``root/<namespace>/<name>/<version>/`` holds adapter_config.json,
adapter_model.safetensors and meta.json. A download goes to ``root/.partial/<random>/`` and is
renamed into place only when complete and verified, with meta.json written last, so an engine
never sees a partial folder and a folder without meta.json is debris from a crash.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")  # Kubernetes DNS-1123 subdomain
VERSION = re.compile(r"^[a-f0-9]{6,64}$")
META_FILE = "meta.json"
PARTIAL = ".partial"

Key = tuple[str, str, str]  # (namespace, name, version)


class CapacityError(Exception):
    """The adapter does not fit even after evicting every other adapter."""


@dataclass
class Entry:
    """One cached adapter version."""

    namespace: str
    name: str
    version: str
    bytes: int
    sha256: str
    path: str
    created_at: float

    @property
    def key(self) -> Key:
        return (self.namespace, self.name, self.version)


def check_key(namespace: str, name: str, version: str) -> Key:
    """Refuse anything that is not a Kubernetes name or a hex version: they become folder names."""
    for what, value, rx in (("namespace", namespace, NAME), ("name", name, NAME),
                            ("version", version, VERSION)):
        if not rx.match(value) or ".." in value:
            raise ValueError(f"invalid {what} {value!r}")
    return (namespace, name, version)


class AdapterCache:
    """The folder index, most recently used last; thread-safe."""

    def __init__(self, root: Path, capacity_bytes: int) -> None:
        self.root = root
        self.capacity_bytes = capacity_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[Key, Entry] = OrderedDict()

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(e.bytes for e in self._entries.values())

    def entries(self) -> list[Entry]:
        with self._lock:
            return list(self._entries.values())

    def get(self, key: Key) -> Entry | None:
        with self._lock:
            return self._entries.get(key)

    def touch(self, key: Key) -> None:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)

    def recover(self) -> tuple[list[Entry], int]:
        """Rebuild the index from disk; remove partial downloads and folders without meta.json.

        Returns the recovered entries and the number of debris folders removed.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        removed = 0
        partial = self.root / PARTIAL
        if partial.exists():
            removed += sum(1 for _ in partial.iterdir())
            shutil.rmtree(partial)
        found: list[Entry] = []
        for folder in sorted(self.root.glob("*/*/*")):
            if not folder.is_dir() or folder.is_symlink():
                continue
            try:
                key = check_key(folder.parent.parent.name, folder.parent.name, folder.name)
                meta = json.loads((folder / META_FILE).read_text())
                entry = Entry(**meta)
                if entry.key != key:
                    raise ValueError("meta.json does not match its folder")
                entry.path = str(folder)
            except (ValueError, TypeError, OSError, json.JSONDecodeError):
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
                continue
            found.append(entry)
        found.sort(key=lambda e: e.created_at)
        with self._lock:
            self._entries = OrderedDict((e.key, e) for e in found)
        return found, removed

    def new_partial(self) -> Path:
        """A fresh folder for one download, invisible to engines until commit()."""
        path = self.root / PARTIAL / uuid.uuid4().hex
        path.mkdir(parents=True)
        return path

    def commit(self, key: Key, partial: Path, size: int, sha256: str
               ) -> tuple[Entry, list[Entry]]:
        """Move a complete download into place, evicting LRU entries to make room.

        Returns the new entry and the entries evicted for it (their folders are gone).
        """
        if size > self.capacity_bytes:
            shutil.rmtree(partial, ignore_errors=True)
            raise CapacityError(f"{size} bytes exceed the node cache capacity of "
                                f"{self.capacity_bytes} bytes")
        final = self.root.joinpath(*key)
        entry = Entry(*key, bytes=size, sha256=sha256, path=str(final), created_at=time.time())
        meta = partial / META_FILE
        with open(meta, "w") as f:
            json.dump(asdict(entry), f)
            f.flush()
            os.fsync(f.fileno())
        evicted: list[Entry] = []
        with self._lock:
            if key in self._entries:  # a concurrent put won; keep the first
                shutil.rmtree(partial, ignore_errors=True)
                return self._entries[key], []
            used = sum(e.bytes for e in self._entries.values())
            while used + size > self.capacity_bytes and self._entries:
                _, old = self._entries.popitem(last=False)
                evicted.append(old)
                used -= old.bytes
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(partial, final)  # atomic on one filesystem
            self._entries[key] = entry
        for old in evicted:
            self._remove_folder(old)
        return entry, evicted

    def evict(self, namespace: str, name: str, version: str | None = None) -> list[Entry]:
        """Remove every cached version of namespace/name (or just one version)."""
        with self._lock:
            keys = [k for k in self._entries
                    if k[:2] == (namespace, name) and version in (None, k[2])]
            gone = [self._entries.pop(k) for k in keys]
        for e in gone:
            self._remove_folder(e)
        return gone

    def _remove_folder(self, entry: Entry) -> None:
        # Rename first so no engine opens a half-deleted folder, then delete.
        path = Path(entry.path)
        trash = self.root / PARTIAL / f"evicted-{uuid.uuid4().hex}"
        try:
            trash.parent.mkdir(parents=True, exist_ok=True)
            os.rename(path, trash)
        except OSError:
            trash = path
        shutil.rmtree(trash, ignore_errors=True)
        for parent in (path.parent, path.parent.parent):
            try:
                parent.rmdir()  # only when empty
            except OSError:
                break
