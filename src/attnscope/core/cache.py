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
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

import torch

from attnscope.core.errors import AttnscopeError

log = logging.getLogger("attnscope")
T = TypeVar("T")

_ENABLED: ContextVar[bool] = ContextVar("attnscope_cache_enabled", default=True)

#: The sub-caches that ``attnscope cache clear`` may remove (nothing else in the folder is touched).
KINDS = ("kernels", "tokens", "gguf", "filehash", "evolution")


def cache_dir() -> Path:
    """Root of attnscope's on-disk cache (``$ATTNSCOPE_CACHE`` or ``~/.cache/attnscope``).

    The first call per root in a process marks it as attnscope's (:func:`mark_cache`) when it exists and
    holds only attnscope's entries."""
    root = _cache_root()
    _mark_once(root)
    return root


def _cache_root() -> Path:
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


def _mkdir_parent(path: Path) -> None:
    """Create ``path``'s folder; a cache root created here is marked as attnscope's (:func:`mark_cache`)."""
    root = _cache_root()
    new_root = not root.exists() and root in path.parents
    path.parent.mkdir(parents=True, exist_ok=True)
    if new_root:
        mark_cache(root)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a unique temporary file name next to ``path``; on success rename it onto ``path`` atomically.

    On an exception (or a kill) the destination is untouched and the temporary file is removed (or left
    as a hidden ``.NAME.PID-XXXX.tmp`` that no reader looks at)."""
    path = Path(path)
    _mkdir_parent(path)
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
    _mkdir_parent(path)
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
    reason = (why if isinstance(why, str)
              else f"{type(why).__name__}: {str(why).splitlines()[0][:120] if str(why) else ''}")
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


#: The marker at the cache root (the Cache Directory Tagging convention, so backup tools skip the folder);
#: ``cache clear`` refuses a folder without it.  Its text names attnscope: another tool's tag is not ours.
MARKER = "CACHEDIR.TAG"
MARKER_TEXT = ("Signature: 8a477f597d28d172789f06886806bc55\n"
               "# This file is a cache directory tag created by attnscope (attnscope cache info / clear).\n"
               "# For information about cache directory tags, see https://bford.info/cachedir/\n")

#: What attnscope writes in each part: an entry's name (and, for a folder, what it holds)
_ENTRY = {
    "kernels": re.compile(r"[0-9a-f]{16}"),
    "tokens": re.compile(r"[0-9a-f]{16}-[0-9a-f]{12,64}\.npy"),
    "gguf": re.compile(r".+-[0-9a-f]{16}"),
    "filehash": re.compile(r"[0-9a-f]{24}"),
    "evolution": re.compile(r"[0-9a-f]{16}\.json"),
}
_TEMPORARY = re.compile(r"\..+\.(\d+)-[0-9a-f]{8}\.tmp")
_KERNEL_FILES = {"kernels.json", "kernels.safetensors"}


def is_cache_entry(kind: str, p: Path) -> bool:
    """Whether ``p`` (in part ``kind``) has the name and form of an entry attnscope writes (or a temporary of one)."""
    if _TEMPORARY.fullmatch(p.name):
        return True
    if p.is_symlink() or not _ENTRY[kind].fullmatch(p.name):
        return False
    if kind == "kernels":
        return p.is_dir() and {f.name for f in p.iterdir()} <= _KERNEL_FILES
    if kind == "gguf":
        return p.is_dir() and (p / "attnscope_source.json").is_file()
    return p.is_file()


def _parts(root: Path) -> dict[str, tuple[list[Path], list[Path]]]:
    """Per part: (attnscope's entries, everything else)."""
    out = {}
    for kind in KINDS:
        d = root / kind
        items = sorted(d.iterdir()) if d.is_dir() and not d.is_symlink() else []
        out[kind] = ([e for e in items if is_cache_entry(kind, e)], [e for e in items if not is_cache_entry(kind, e)])
    return out


def is_marked(root: Path) -> bool:
    try:
        return "attnscope" in (root / MARKER).read_text(errors="replace")
    except OSError:
        return False


def foreign_files(root: Path) -> list[Path]:
    """What in ``root`` attnscope did not write: any top-level item other than the parts and the marker, and
    anything in a part that is not an entry's form (``kernels/src/``, ``tokens/secrets.txt``)."""
    if not root.is_dir():
        return []
    top = [p for p in sorted(root.iterdir()) if p.name not in (*KINDS, MARKER) or p.is_symlink()
           or (p.name in KINDS and not p.is_dir())]
    return top + [e for _, other in _parts(root).values() for e in other]


_MARK_CHECKED: set[Path] = set()


def mark_cache(root: Path | None = None, create: bool = False) -> bool:
    """Write the marker in the cache root if attnscope owns it: the root is new or empty, or everything in it
    has the form of attnscope's entries (a cache written before markers existed: migrated).  Returns whether
    the root is marked.  A folder holding other files is never marked (``cache clear`` then refuses it)."""
    root = root or cache_dir()
    if is_marked(root):
        return True
    try:
        if create:
            root.mkdir(parents=True, exist_ok=True)
        if not root.is_dir() or foreign_files(root):
            return False
        write_text(root / MARKER, MARKER_TEXT)
    except OSError:
        return False
    return True


def _mark_once(root: Path) -> None:
    if root not in _MARK_CHECKED and root.is_dir():  # a root not created yet is checked again next time
        _MARK_CHECKED.add(root)
        mark_cache(root)


def cache_info() -> dict[str, Any]:
    """Location, marker, and per part: attnscope's entries, their bytes, temporaries, and other files (kept)."""
    root = cache_dir()
    kinds = {}
    for kind, (entries, other) in _parts(root).items():
        kept = [e for e in entries if not _TEMPORARY.fullmatch(e.name)]
        kinds[kind] = {"entries": len(kept), "bytes": sum(_size(e) for e in kept),
                       "temporary": len(entries) - len(kept), "not_attnscope": len(other)}
    return {"path": str(root), "env": "ATTNSCOPE_CACHE", "marked": is_marked(root), "kinds": kinds,
            "not_attnscope": len(foreign_files(root)), "total_bytes": sum(k["bytes"] for k in kinds.values())}


def clear_plan(kinds: list[str] | None = None) -> tuple[list[Path], int]:
    """The entries ``cache clear`` would remove (attnscope's entries of the named parts, and temporaries of
    processes that no longer run) and their bytes.  Raises a one-line error if the root is not attnscope's."""
    root = cache_dir()
    if not root.is_dir():
        return [], 0
    if not mark_cache(root):
        bad = foreign_files(root)
        raise AttnscopeError(f"{root} has no attnscope cache marker ({MARKER}) and holds files attnscope did not write "
                             f"(e.g. {bad[0].relative_to(root) if bad else '?'}); attnscope clears only a cache it "
                             "created: check ATTNSCOPE_CACHE, or remove its entries by hand")
    parts = _parts(root)
    entries = []
    for kind in kinds or KINDS:
        for e in parts[kind][0]:
            m = _TEMPORARY.fullmatch(e.name)
            if m is None or not pid_alive(int(m.group(1))):
                entries.append(e)
    return entries, sum(_size(e) for e in entries)


def cache_clear(kinds: list[str] | None = None) -> int:
    """Remove attnscope's entries of the named parts (default all of them), nothing else; returns the bytes
    freed.  Raises a one-line error if the cache root is not attnscope's (see :func:`clear_plan`)."""
    entries, freed = clear_plan(kinds)
    for e in entries:
        if e.is_dir() and not e.is_symlink():
            shutil.rmtree(e, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                e.unlink()
    for d in {e.parent for e in entries}:
        with contextlib.suppress(OSError):  # the part's folder, only when this left it empty
            d.rmdir()
    return freed


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a temporary entry or staging folder of a live writer is kept)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True
