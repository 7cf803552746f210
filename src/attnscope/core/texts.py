"""Text sources: deterministic samples of fixed-length token windows.

A source is a text file, a folder of text files (``*.txt``, ``*.md``, ``*.text``, ``*.jsonl``; binary
files are skipped with a note), a JSONL file whose lines are objects with a ``text`` string,
``bundled:NAME`` (texts shipped with attnscope; ``bundled:`` for all of them), or
``hf:DATASET[:CONFIG][:SPLIT]`` (a Hugging Face dataset, when online).  Files must be UTF-8: an
undecodable byte is a one-line error naming the file and the byte offset, unless decoding is relaxed with
:func:`decoding` (the CLI's ``--decode-errors replace``).  Documents are tokenised once (cached on disk, keyed by
tokenizer and text hash) and joined with the tokenizer's end-of-text/separator token; windows are drawn from the
joined stream with a seeded generator, so the same seed gives the same samples on any machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from attnscope.core.cache import atomic_path, cache_dir, caching_enabled, read_or_drop
from attnscope.core.errors import AttnscopeError, ConditionFailedError, TextTooShortError
from attnscope.core.hub import hub_reachable

log = logging.getLogger("attnscope")

TEXT_SUFFIXES = (".txt", ".md", ".text", ".jsonl")


@dataclass
class TextSource:
    """Named documents read from one source."""

    spec: str
    documents: list[tuple[str, str]]  # (name, text)
    _sha: str | None = field(default=None, repr=False)

    @property
    def sha256(self) -> str:
        """Hash of the documents' names and texts (a file name that is not UTF-8 is hashed as its bytes)."""
        if self._sha is None:
            h = hashlib.sha256()
            for name, text in self.documents:
                h.update(_bytes(name) + b"\0" + _bytes(text) + b"\0")
            self._sha = h.hexdigest()
        return self._sha

    @property
    def content_sha256(self) -> str:
        """Hash of the texts alone, in order (two copies of one file under other names hash the same)."""
        h = hashlib.sha256()
        for _, text in self.documents:
            h.update(_bytes(text) + b"\0")
        return h.hexdigest()

    @property
    def n_chars(self) -> int:
        return sum(len(t) for _, t in self.documents)


def _bytes(s: str) -> bytes:
    """UTF-8 bytes of ``s``; lone surrogates (undecodable bytes of a file name, os.fsdecode) as their bytes."""
    return s.encode("utf-8", "surrogateescape") if _has_surrogates(s) else s.encode()


def _has_surrogates(s: str) -> bool:
    try:
        s.encode()
    except UnicodeEncodeError:
        return True
    return False


#: How undecodable bytes are handled: "strict" (default: a one-line error naming the file and byte offset)
#: or "replace" (U+FFFD, the CLI's ``--decode-errors replace``).  Set it for a block with :func:`decoding`.
DECODE_ERRORS: ContextVar[str] = ContextVar("attnscope_decode_errors", default="strict")
BINARY_PROBE = 8192  # bytes inspected for NUL bytes: a file with one is binary, not text


@contextlib.contextmanager
def decoding(errors: str) -> Iterator[None]:
    """Within the block, decode text files with ``errors`` ("strict" or "replace")."""
    if errors not in ("strict", "replace"):
        raise AttnscopeError(f"--decode-errors {errors!r} is not known; use strict or replace")
    token = DECODE_ERRORS.set(errors)
    try:
        yield
    finally:
        DECODE_ERRORS.reset(token)


def bundled_dir() -> Path:
    return Path(str(resources.files("attnscope"))) / "assets" / "texts"


def bundled_texts() -> list[str]:
    """Names of the texts shipped with attnscope (held-out excerpts of the labelled corpora)."""
    d = bundled_dir()
    return sorted(p.stem for p in d.glob("*.txt")) if d.exists() else []


def is_binary(path: Path) -> bool:
    with path.open("rb") as f:
        return b"\0" in f.read(BINARY_PROBE)


#: The sources read so far in this command (spec -> TextSource), while :func:`reading_once` is active.
_READ: ContextVar[dict[str, TextSource] | None] = ContextVar("attnscope_sources_read", default=None)


@contextlib.contextmanager
def reading_once() -> Iterator[None]:
    """Within the block, each text source is read once: later :func:`open_source` calls of the same spec get
    the same documents (a FIFO or a shell's ``<(cat f)`` can only be read once)."""
    token = _READ.set({})
    try:
        yield
    finally:
        _READ.reset(token)


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8", errors=DECODE_ERRORS.get())
    except UnicodeDecodeError as err:
        raise AttnscopeError(
            f"{path} is not valid UTF-8 (byte {err.start}: {data[err.start:err.start + 4]!r}); convert it to UTF-8 "
            "(e.g. iconv -f latin1 -t utf-8) or pass --decode-errors replace to accept replacement characters"
        ) from None


def _read_jsonl(path: Path, data: bytes, field_name: str = "text") -> list[tuple[str, str]]:
    docs = []
    for i, line in enumerate(_decode(path, data).splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise AttnscopeError(f"{path}:{i + 1} is not valid JSON ({err.msg}); "
                                 "JSONL needs one object per line") from None
        if not isinstance(rec, dict):
            raise AttnscopeError(f"{path}:{i + 1} is a JSON {type(rec).__name__}, not an object; each JSONL line needs "
                                 f'an object like {{"{field_name}": "..."}}')
        if field_name not in rec:
            raise AttnscopeError(f"{path}:{i + 1} has no {field_name!r} field; "
                                 f"each JSONL line needs a {field_name!r} string")
        if not isinstance(rec[field_name], str):
            raise AttnscopeError(f"{path}:{i + 1} has a {field_name!r} that is {json.dumps(rec[field_name])[:20]}, "
                                 f"not a string; give every line a {field_name!r} string (drop lines without text)")
        docs.append((f"{path.name}:{i + 1}", rec[field_name]))
    return docs


def _read_file(path: Path, data: bytes | None = None) -> list[tuple[str, str]]:
    """The documents of one file, read once (``data``: its bytes, when already read)."""
    try:
        data = path.read_bytes() if data is None else data
        if b"\0" in data[:BINARY_PROBE]:
            raise AttnscopeError(f"{path} is a binary file (it holds NUL bytes), not text; pass a UTF-8 text file")
        if path.suffix == ".jsonl":
            return _read_jsonl(path, data)
        return [(path.name, _decode(path, data))]
    except PermissionError:
        raise AttnscopeError(f"cannot read {path} (permission denied); check its permissions") from None
    except IsADirectoryError:
        raise AttnscopeError(f"{path} is a folder; pass its path without a trailing file name") from None


def _read_folder(p: Path, spec: str) -> list[tuple[str, str]]:
    try:
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
    except PermissionError as err:
        raise AttnscopeError(f"cannot list {err.filename or spec} (permission denied); check its permissions") from None
    if not files:
        raise AttnscopeError(f"folder {spec} holds no text files ({', '.join(TEXT_SUFFIXES)})")
    data = {}
    for f in files:
        try:
            data[f] = f.read_bytes()
        except PermissionError:
            raise AttnscopeError(f"cannot read {f} (permission denied); check its permissions") from None
    binary = [f for f in files if b"\0" in data[f][:BINARY_PROBE]]
    if binary:
        log.warning("skipped %d binary file(s) in %s: %s", len(binary), spec, ", ".join(f.name for f in binary[:5]))
    return [d for f in files if f not in binary for d in _read_file(f, data[f])]


def open_source(spec: str | Path) -> TextSource:
    """Read a text source (see module docstring); raises a one-line error if it does not exist or is not text.

    Within :func:`reading_once` (every CLI command) a source is read once and its documents reused."""
    spec = str(spec)
    read = _READ.get()
    if read is not None and spec in read:
        return read[spec]
    src = _open_source(spec)
    if read is not None:
        read[spec] = src
    return src


def _open_source(spec: str) -> TextSource:
    if not spec.strip():
        raise AttnscopeError("an empty text source was given; pass a file, a folder, bundled:NAME or hf:DATASET")
    if spec.startswith("bundled:") or spec == "bundled":
        name = spec.split(":", 1)[1] if ":" in spec else ""
        if name in ("", "all"):
            return TextSource(spec, _read_folder(bundled_dir(), spec))
        p = bundled_dir() / f"{name.removesuffix('.txt')}.txt"
        if not p.exists():
            raise AttnscopeError(f"no bundled text {name!r}; available: {', '.join(bundled_texts())} "
                                 "(or bundled: for all)")
        return TextSource(spec, _read_file(p))
    if spec.startswith("hf:"):
        return _hf_dataset(spec)
    p = Path(spec).expanduser()
    if not p.exists():
        raise AttnscopeError(f"no such text file or folder: {spec}; pass a .txt/.jsonl file, a folder, or bundled:NAME")
    docs = _read_folder(p, spec) if p.is_dir() else _read_file(p)
    docs = [(n, t) for n, t in docs if t.strip()]
    if not docs:
        raise TextTooShortError(f"{spec} holds no text; pass a non-empty file")
    return TextSource(spec, docs)


def _hf_dataset(spec: str) -> TextSource:
    parts = spec[3:].split(":")
    name, config = parts[0], (parts[1] or None) if len(parts) > 1 else None
    split = parts[2] if len(parts) > 2 else "train"
    if not hub_reachable(timeout=2.0):  # streaming needs the hub: fail in seconds, not after 30 s of retries
        raise AttnscopeError(f"could not read Hugging Face dataset {name!r}: the hub cannot be reached (offline, or "
                             "HF_HUB_OFFLINE is set); pass a local text file or folder instead")
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise AttnscopeError("hf: text sources need the `datasets` package: pip install 'attnscope[hub]'") from None
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
        docs = []
        for i, rec in enumerate(ds):
            if i >= 2000:
                break
            docs.append((f"{name}:{i}", rec["text"]))
    except Exception as err:  # noqa: BLE001 - the hub raises many kinds
        raise AttnscopeError(
            f"could not read Hugging Face dataset {name!r} ({str(err).splitlines()[0][:150]}); "
            "offline, pass a local text file or folder instead"
        ) from None
    return TextSource(spec, docs)


def _separator_id(tokenizer) -> int | None:
    for attr in ("eos_token_id", "sep_token_id", "bos_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return None


def tokenizer_sha256(tokenizer) -> str:
    """Full-content hash of a tokenizer: its whole serialised definition (vocabulary, merges, normaliser,
    pre-tokeniser, added tokens), its class and the separator used between documents; memoised per object."""
    memo = getattr(tokenizer, "_attnscope_sha256", None)
    if memo is not None and memo[0] == len(tokenizer):  # tokens added since: hash again
        return memo[1]
    h = hashlib.sha256(f"{tokenizer.__class__.__name__}|{len(tokenizer)}|{_separator_id(tokenizer)}".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # a slow tokenizer: its vocabulary with ids and its special tokens
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        h.update(json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str).encode())
    digest = h.hexdigest()
    with contextlib.suppress(AttributeError, TypeError):
        tokenizer._attnscope_sha256 = (len(tokenizer), digest)
    return digest


def _cache_path(tokenizer, source: TextSource) -> Path:
    return cache_dir() / "tokens" / f"{source.sha256[:16]}-{tokenizer_sha256(tokenizer)[:24]}.npy"


def _load_tokens(path: Path, vocab_size: int | None = None) -> np.ndarray:
    arr = np.load(path, allow_pickle=False)
    if arr.dtype != np.int64 or arr.ndim != 1:
        raise ValueError(f"holds {arr.dtype} {arr.shape}, not a 1-d int64 token stream")
    if vocab_size is not None and len(arr) and (arr.min() < 0 or arr.max() >= vocab_size):
        raise ValueError(f"holds token ids {int(arr.min())}..{int(arr.max())}, "
                         f"outside this tokenizer's 0..{vocab_size - 1}")
    return arr


def tokenize(source: TextSource, tokenizer, *, cache: bool | None = None) -> np.ndarray:
    """All documents as one token stream (int64), joined with the end-of-text / separator token.

    ``cache`` (default: on unless disabled with :func:`attnscope.core.cache.caching`) reads and writes the
    on-disk token cache; an unreadable entry is dropped and recomputed."""
    use = caching_enabled() if cache is None else cache
    path = _cache_path(tokenizer, source)
    if use and (hit := read_or_drop(path, lambda p: _load_tokens(p, len(tokenizer)))) is not None:
        return hit
    sep = _separator_id(tokenizer)
    chunks: list[list[int]] = []
    for _, text in source.documents:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        chunks.append(ids)
        if sep is not None and len(source.documents) > 1:
            chunks.append([sep])
    out = np.fromiter((i for c in chunks for i in c), dtype=np.int64)
    if use:
        try:
            with atomic_path(path) as tmp, tmp.open("wb") as f:
                np.save(f, out)
        except OSError as err:
            log.warning("could not write the token cache %s (%s); continuing without it", path, err.strerror)
    return out


#: The stated condition on a calibration or evaluation text: at least this many distinct tokens, and no one
#: token on more than this share of its positions.  A text of one repeated token makes every position alike:
#: its "conditions" measure 0.000 and its contrasts are infinite, so numbers on it would look perfect.
MIN_DISTINCT_TOKENS = 20
MAX_TOP_TOKEN_SHARE = 0.5


def token_diversity(ids) -> tuple[int, float]:
    """``(distinct tokens, share of the positions held by the most frequent one)`` of a token sequence."""
    t = torch.as_tensor(ids).reshape(-1)
    if t.numel() == 0:
        return 0, 1.0
    counts = torch.bincount(t - t.min())
    return int((counts > 0).sum()), float(counts.max()) / t.numel()


def require_diverse(ids, spec: str, role: str) -> None:
    """Refuse (``ConditionFailedError``) a ``role`` text ("calibration", "evaluation") that breaks the stated
    token-diversity condition (:data:`MIN_DISTINCT_TOKENS`, :data:`MAX_TOP_TOKEN_SHARE`)."""
    n, top = token_diversity(ids)
    if n < MIN_DISTINCT_TOKENS or top > MAX_TOP_TOKEN_SHARE:
        raise ConditionFailedError(
            f"the {role} text {spec} has {n} distinct tokens and its most frequent token fills {top:.0%} of it; the "
            f"method needs {'an' if role[0] in 'aeiou' else 'a'} {role} text with at least {MIN_DISTINCT_TOKENS} "
            "distinct tokens and none above "
            f"{MAX_TOP_TOKEN_SHARE:.0%} (a degenerate text would score as perfect); pass ordinary running text")


def sample_windows(stream: np.ndarray, n_ctx: int, n_samples: int, *, seed: int = 0,
                   bos_token_id: int | None = None, source_name: str = "text") -> Tensor:
    """``[n_samples, n_ctx]`` windows drawn from ``stream`` (BOS in front when ``bos_token_id`` is given).

    Windows start at evenly spaced offsets shuffled by ``seed`` when the stream has room for them all
    without overlap, and at seeded random offsets otherwise.
    """
    body = n_ctx - (1 if bos_token_id is not None else 0)
    if body < 1:
        raise ValueError("n_ctx must leave room for at least one text token")
    if len(stream) < body:
        raise TextTooShortError(
            f"{source_name} has {len(stream)} tokens but {n_ctx} are needed per sample; "
            "pass a longer text or a smaller context (--n-ctx)"
        )
    rng = np.random.default_rng(seed)
    n_starts = len(stream) - body + 1
    if n_samples * body > len(stream):
        log.warning("%s has %d tokens, too few for %d disjoint windows of %d: windows overlap (held-out windows may "
                    "repeat estimation text); pass a longer text or fewer or shorter windows",
                    source_name, len(stream), n_samples, body)
    if n_samples * body <= len(stream):
        starts = (np.arange(n_samples) * body + rng.integers(0, len(stream) - n_samples * body + 1)) % n_starts
        starts = rng.permutation(starts)
    else:
        starts = rng.integers(0, n_starts, size=n_samples)
    win = np.stack([stream[s : s + body] for s in starts])
    if bos_token_id is not None:
        win = np.concatenate([np.full((n_samples, 1), bos_token_id, dtype=np.int64), win], axis=1)
    return torch.from_numpy(win)


def load_windows(spec: str | Path, tokenizer, n_ctx: int, n_samples: int, *, seed: int = 0,
                 bos_token_id: int | None = None) -> tuple[Tensor, dict]:
    """Open, tokenise and sample a source; returns ``(windows [n_samples, n_ctx], provenance)``."""
    src = open_source(spec)
    stream = tokenize(src, tokenizer)
    win = sample_windows(stream, n_ctx, n_samples, seed=seed, bos_token_id=bos_token_id, source_name=str(spec))
    prov = {"source": str(spec), "sha256": src.sha256, "n_tokens": int(len(stream)), "n_ctx": n_ctx,
            "n_samples": n_samples, "seed": seed, "bos_token_id": bos_token_id,
            "windows_overlap": n_samples * (n_ctx - (bos_token_id is not None)) > len(stream)}
    return win, prov


def text_tokens(spec: str | Path, tokenizer, *, max_tokens: int | None = None, min_tokens: int = 1,
                bos_token_id: int | None = None) -> Tensor:
    """One text's tokens ``[pos]`` from its beginning (BOS first when given), for traces and calibration."""
    src = open_source(spec)
    stream = tokenize(src, tokenizer)
    if bos_token_id is not None:
        stream = np.concatenate([[bos_token_id], stream])
    if max_tokens is not None:
        stream = stream[:max_tokens]
    if len(stream) < min_tokens:
        raise TextTooShortError(
            f"{spec} has {len(stream)} tokens but at least {min_tokens} are needed; pass a longer text"
        )
    return torch.as_tensor(stream, dtype=torch.long)


def decode_tokens(tok, ids: list[int]) -> list[str]:
    """Each token id as the text it stands for (one string per id, byte-level BPE pieces joined back into
    characters, a leading space kept): the one token display used by cards, contrasts, evolution and the page."""
    return [tok.convert_tokens_to_string([t]) for t in tok.convert_ids_to_tokens(ids)]
