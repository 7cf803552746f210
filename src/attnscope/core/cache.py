"""The one home of attnscope's on-disk caching and of its atomic file writes.

Location: ``$ATTNSCOPE_CACHE`` if set, else ``~/.cache/attnscope``.  Sub-caches:

* ``kernels/KEY/``   - kernel analyses (``kernels.json`` + ``kernels.safetensors``), keyed by the weights'
  full-content hash, the settings and the samples' hash;
* ``tokens/KEY.npy`` - tokenised text sources, keyed by the text's and the tokenizer's hash;
* ``gguf/NAME-KEY/`` - de-quantised copies of ``.gguf`` models (float32 Hugging Face folders; large);
* ``filehash/KEY``   - memoised sha256 of weight files, keyed by path, size and mtime.

Crash safety: every entry is written under a unique temporary name (pid + random suffix) in the same
folder and then renamed into place with one atomic ``os.replace``/``rename``; a folder entry is renamed
as a whole only once all its files (data first, index last) are written.  A reader therefore sees a
complete entry or none.  An entry that fails to read (truncated, corrupt, from an old version) is
dropped with one logged line and recomputed.  ``attnscope cache info`` / ``attnscope cache clear``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

import torch

log = logging.getLogger("attnscope")
T = TypeVar("T")

_ENABLED: ContextVar[bool] = ContextVar("attnscope_cache_enabled", default=True)

#: The sub-caches that ``attnscope cache clear`` may remove (nothing else in the folder is touched).
KINDS = ("kernels", "tokens", "gguf", "filehash", "evolution")


def cache_dir() -> Path:
    """Root of attnscope's on-disk cache (``$ATTNSCOPE_CACHE`` or ``~/.cache/attnscope``)."""
    return Path(os.environ.get("ATTNSCOPE_CACHE") or Path.home() / ".cache" / "attnscope").expanduser()


def caching_enabled() -> bool:
    """Whether cache reads and writes are on (the CLI's ``--no-cache`` turns them off for one command)."""
    return _ENABLED.get()


@contextlib.contextmanager
def caching(enabled: bool) -> Iterator[None]:
    """Within the block, use (``True``) or bypass (``False``) every on-disk cache."""
    token = _ENABLED.set(enabled)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a unique temporary file name next to ``path``; on success rename it onto ``path`` atomically.

    On an exception (or a kill) the destination is untouched and the temporary file is removed (or left
    as a hidden ``.NAME.PID-XXXX.tmp`` that no reader looks at)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, obj: Any, indent: int | None = 1) -> Path:
    return write_text(path, json.dumps(obj, indent=indent, default=str))


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``path``; on success it becomes ``path`` in one rename.

    If another process published ``path`` first, its copy is kept and ours is discarded (both were
    computed from the same key, so they hold the same thing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():  # a stale or concurrent entry: replace a broken one, keep a good one
            return
        try:
            os.rename(tmp, path)
        except OSError:  # another writer won the race between exists() and rename()
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def drop(path: str | Path, why: BaseException | str) -> None:
    """Remove a cache entry that failed to read, with one logged line."""
    path = Path(path)
    reason = why if isinstance(why, str) else f"{type(why).__name__}: {str(why).splitlines()[0][:120] if str(why) else ''}"
    log.warning("dropped unreadable cache entry %s (%s); recomputing it", path, reason)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def read_or_drop(path: str | Path, reader: Callable[[Path], T]) -> T | None:
    """``reader(path)`` if the entry exists and reads; ``None`` if absent; a failed read drops the entry."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return reader(path)
    except Exception as err:  # noqa: BLE001 - any failure means: recompute
        drop(path, err)
        return None


# --- content hashes -----------------------------------------------------------------------------
def file_sha256(path: str | Path) -> str:
    """Full sha256 of a file, computed once and memoised on disk by (resolved path, size, mtime)."""
    p = Path(path).resolve()
    st = p.stat()
    memo_key = hashlib.sha256(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]
    memo = cache_dir() / "filehash" / memo_key
    got = read_or_drop(memo, lambda m: m.read_text().strip())
    if got is not None and len(got) == 64:
        return got
    h = hashlib.sha256()
    with p.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    with contextlib.suppress(OSError):  # an unwritable cache only costs the memo
        write_text(memo, digest)
    return digest


def tensor_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Full-content sha256 of named tensors (every byte, with name, dtype and shape)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        flat = t.reshape(-1).contiguous().cpu()
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()


def _tensor_state(tensors: dict[str, torch.Tensor]) -> tuple:
    """Changes when any tensor is replaced or edited in place (torch's per-storage version counter)."""
    return tuple((k, id(t), t.data_ptr(), t._version) for k, t in sorted(tensors.items()))


def remember_source_files(w: Any, files: list[Path]) -> None:
    """Record which files ``w`` was loaded from, and the state of its tensors right after loading."""
    w.__dict__["_attnscope_source"] = ([Path(f) for f in files], _tensor_state(w.tensors()))


def weights_fingerprint(w: Any) -> str:
    """Full-content key of a :class:`~attnscope.models.ModelWeights` (16 hex digits).

    Weights untouched since they were loaded from files are keyed by the files' memoised sha256 (no
    hashing after the first run); weights edited or replaced in memory are hashed tensor by tensor
    (memoised in this process until a tensor changes again)."""
    tensors = w.tensors()
    state = _tensor_state(tensors)
    h = hashlib.sha256(json.dumps({k: v for k, v in w.info().items() if k != "dtype"}, sort_keys=True).encode())
    source = w.__dict__.get("_attnscope_source")
    if source is not None and source[1] == state:
        for f in source[0]:
            h.update(f"file|{f.name}|{file_sha256(f)}".encode())
        return h.hexdigest()[:16]
    memo = w.__dict__.get("_attnscope_tensor_hash")
    if memo is None or memo[0] != state:
        memo = (state, tensor_sha256(tensors))
        w.__dict__["_attnscope_tensor_hash"] = memo
    h.update(f"tensors|{memo[1]}".encode())
    return h.hexdigest()[:16]


# --- info / clear -------------------------------------------------------------------------------
def _size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def cache_info() -> dict[str, Any]:
    """Location, and entries and bytes per sub-cache."""
    root = cache_dir()
    kinds = {}
    for kind in KINDS:
        d = root / kind
        entries = [e for e in d.iterdir() if not e.name.startswith(".")] if d.is_dir() else []
        kinds[kind] = {"entries": len(entries), "bytes": sum(_size(e) for e in entries) if entries else 0,
                       "temporary": len([e for e in d.iterdir() if e.name.endswith(".tmp")]) if d.is_dir() else 0}
    return {"path": str(root), "env": "ATTNSCOPE_CACHE", "kinds": kinds,
            "total_bytes": sum(k["bytes"] for k in kinds.values())}


def cache_clear(kinds: list[str] | None = None) -> int:
    """Remove the named sub-caches (default all of them); returns the bytes freed."""
    root = cache_dir()
    freed = 0
    for kind in kinds or KINDS:
        d = root / kind
        if d.is_dir():
            freed += _size(d)
            shutil.rmtree(d, ignore_errors=True)
    return freed


# --- command outputs --------------------------------------------------------------------------------
def _manifest(out: Path, command: str) -> Path:
    return out / f".attnscope-{command}-manifest.json"


def publish(staging: Path, out: Path, command: str) -> list[Path]:
    """Move every file of ``staging`` into ``out`` (one atomic rename each; JSON indexes last) and remove
    the files that an older run of ``command`` wrote there and this run did not.  Other files are never
    touched: only paths listed in the older run's manifest are removed."""
    new = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
    for rel in sorted(new, key=lambda r: (r.endswith(".json"), r)):  # data before index
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / rel, dst)
    old = read_or_drop(_manifest(out, command), lambda p: json.loads(p.read_text())["files"]) or []
    for rel in sorted(set(old) - set(new)):
        p = (out / rel).resolve()
        if out.resolve() in p.parents and p.is_file():
            p.unlink()
            with contextlib.suppress(OSError):  # only folders this left empty
                p.parent.rmdir()
    write_json(_manifest(out, command), {"command": command, "files": new})
    return [out / r for r in new]


@contextlib.contextmanager
def staged_output(out: str | Path, command: str) -> Iterator[Path]:
    """Yield a hidden staging folder inside ``out``; on success :func:`publish` it into ``out``.

    A failed or interrupted command leaves ``out`` as it was (the staging folder is removed)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".attnscope-staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        publish(staging, out, command)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
