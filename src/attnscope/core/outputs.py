"""Command outputs written atomically and never over files attnscope did not write.

Every command writes into a staging folder inside ``--out`` (``.attnscope-staging-PID-*``) and publishes each file
with one atomic rename, JSON indexes last; a manifest per command (``OUT/.attnscope-COMMAND-manifest.json``) lists
what it wrote, so a rerun removes only its own older files, and a file no manifest lists is refused unless the
CLI's ``--force`` (:func:`overwriting`).  Staging folders left by a killed run are removed on the next run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

from attnscope.core.cache import log, pid_alive, read_or_drop, write_json
from attnscope.core.errors import AttnscopeError

STAGING_PREFIX = ".attnscope-staging-"
_FORCE: ContextVar[bool] = ContextVar("attnscope_force_overwrite", default=False)


@contextlib.contextmanager
def overwriting(force: bool) -> Iterator[None]:
    """Within the block, let :func:`staged_output` replace files attnscope did not write (the CLI's ``--force``)."""
    token = _FORCE.set(force)
    try:
        yield
    finally:
        _FORCE.reset(token)


def _manifest(out: Path, command: str) -> Path:
    return out / f".attnscope-{command}-manifest.json"


def _abs(p: Path) -> Path:
    return Path(os.path.abspath(p))


def written_by_attnscope(out: str | Path) -> set[Path]:
    """Every file that a manifest in ``out`` or in a folder above it lists (``report`` lists ``kernels/...``)."""
    out = _abs(Path(out))
    known: set[Path] = set()
    for folder in (out, *out.parents):
        for m in folder.glob(".attnscope-*-manifest.json") if folder.is_dir() else []:
            files = read_or_drop(m, lambda p: json.loads(p.read_text())["files"]) or []
            known |= {_abs(folder / f) for f in files if isinstance(f, str)}
            known.add(m)
    return known


def foreign_outputs(out: str | Path, rels: list[str]) -> list[Path]:
    """The paths among ``out/REL`` (and the folders above them, up to ``out``) that stand in the way and that no
    attnscope manifest lists: a user's own files, never replaced without ``--force``."""
    out = _abs(Path(out))
    known = written_by_attnscope(out)
    bad: set[Path] = set()
    for rel in rels:
        dst = out / rel
        for par in list(reversed(Path(rel).parents))[1:]:  # the folders between out and the file
            q = out / par
            if not q.exists() and not q.is_symlink():
                break
            if not q.is_dir():  # a file where a folder goes
                if q not in known:
                    bad.add(q)
                break
        else:
            if dst.is_dir():
                bad.add(dst)
            elif (dst.exists() or dst.is_symlink()) and dst not in known:
                bad.add(dst)
    return sorted(bad)


def refuse_foreign(out: str | Path, rels: list[str], force: bool | None = None) -> None:
    """Raise a one-line error if writing ``rels`` into ``out`` would replace something attnscope did not write."""
    force = _FORCE.get() if force is None else force
    bad = foreign_outputs(out, rels)
    dirs = [p for p in bad if p.is_dir() and not p.is_symlink()]
    if dirs:
        raise AttnscopeError(f"{dirs[0]} is a folder where attnscope writes a file; move it away or pick another --out")
    if bad and not force:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise AttnscopeError(f"{bad[0]}{more} exists and was not written by attnscope (no attnscope manifest lists "
                             "it); move it away, pick another --out, or pass --force to overwrite it")




def clean_leftovers(out: str | Path) -> list[Path]:
    """Remove staging folders and temporary files in ``out`` left by attnscope processes that no longer run
    (a ``kill -9``); those of a live process (a concurrent run) are kept."""
    out = Path(out)
    gone = []
    for p in out.glob(".attnscope-staging-*") if out.is_dir() else []:
        parts = p.name[len(STAGING_PREFIX):].split("-")
        if parts and parts[0].isdigit() and not pid_alive(int(parts[0])):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    for p in out.glob(".*.tmp") if out.is_dir() else []:
        pid = p.name.rsplit(".", 2)[-2].split("-")[0] if p.name.count(".") >= 2 else ""
        if pid.isdigit() and not pid_alive(int(pid)) and p.is_file():
            with contextlib.suppress(OSError):
                p.unlink()
                gone.append(p)
    if gone:
        log.warning("removed %d leftover staging folder(s) or temporary file(s) of an interrupted run in %s",
                    len(gone), out)
    return gone


def _remove_empty_parents(p: Path, stop: Path) -> None:
    """Remove the folders above ``p`` that are empty, up to (not including) ``stop``."""
    for d in p.parents:
        if d == stop or stop not in d.parents:
            break
        try:
            d.rmdir()
        except OSError:
            break


def publish(staging: Path, out: Path, command: str, force: bool | None = None) -> list[Path]:
    """Move every file of ``staging`` into ``out`` (one atomic rename each; JSON indexes last) and remove
    the files that an older run of ``command`` wrote there and this run did not.  A file that no attnscope
    manifest lists is never replaced (an error, unless ``force``) and never removed."""
    new = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
    refuse_foreign(out, new, force)
    for rel in sorted(new, key=lambda r: (r.endswith(".json"), r)):  # data before index
        dst = out / rel
        for parent in reversed(dst.relative_to(out).parents[:-1]):  # --force: a file where a folder goes
            if (out / parent).is_file() or (out / parent).is_symlink():
                (out / parent).unlink()
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / rel, dst)
    old = read_or_drop(_manifest(out, command), lambda p: json.loads(p.read_text())["files"]) or []
    for rel in sorted(set(old) - set(new)):
        p = (out / rel).resolve()
        if out.resolve() in p.parents and p.is_file():
            p.unlink()
            _remove_empty_parents(p, out.resolve())  # only folders this left empty (later/L1 and later/)
    write_json(_manifest(out, command), {"command": command, "files": new})
    return [out / r for r in new]


@contextlib.contextmanager
def staged_output(out: str | Path, command: str, force: bool | None = None) -> Iterator[Path]:
    """Yield a hidden staging folder inside ``out``; on success :func:`publish` it into ``out``.

    A failed or interrupted command leaves ``out`` as it was: the staging folder is removed, and so are the
    folders this call created (no new empty ``out``).  Leftovers of killed runs are removed first."""
    out = Path(out)
    created = [p for p in (out, *out.parents) if not p.exists()]
    out.mkdir(parents=True, exist_ok=True)
    clean_leftovers(out)
    staging = out / f"{STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    ok = False
    try:
        staging.mkdir()
        yield staging
        publish(staging, out, command, force)
        ok = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not ok:
            for p in created:  # deepest first; only if still empty
                with contextlib.suppress(OSError):
                    p.rmdir()
