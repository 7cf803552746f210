"""Text sources: deterministic samples of fixed-length token windows.

A source is a text file, a folder of text files (``*.txt``, ``*.md``, ``*.jsonl``), a JSONL file with a
``text`` field, ``bundled:NAME`` (texts shipped with attnscope), or ``hf:DATASET[:CONFIG][:SPLIT]`` (a
Hugging Face dataset, when online).  Documents are tokenised once (cached on disk, keyed by tokenizer
and text hash) and joined with the tokenizer's end-of-text/separator token; windows are drawn from the
joined stream with a seeded generator, so the same seed gives the same samples on any machine.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import AttnscopeError, TextTooShortError

TEXT_SUFFIXES = (".txt", ".md", ".text", ".jsonl")


@dataclass
class TextSource:
    """Named documents read from one source."""

    spec: str
    documents: list[tuple[str, str]]  # (name, text)
    _sha: str | None = field(default=None, repr=False)

    @property
    def sha256(self) -> str:
        if self._sha is None:
            h = hashlib.sha256()
            for name, text in self.documents:
                h.update(name.encode() + b"\0" + text.encode() + b"\0")
            self._sha = h.hexdigest()
        return self._sha

    @property
    def n_chars(self) -> int:
        return sum(len(t) for _, t in self.documents)


def bundled_dir() -> Path:
    return Path(str(resources.files("attnscope"))) / "assets" / "texts"


def bundled_texts() -> list[str]:
    """Names of the texts shipped with attnscope (held-out excerpts of the labelled corpora)."""
    d = bundled_dir()
    return sorted(p.stem for p in d.glob("*.txt")) if d.exists() else []


def _read_jsonl(path: Path, field_name: str = "text") -> list[tuple[str, str]]:
    docs = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise AttnscopeError(f"{path}:{i + 1} is not valid JSON ({err.msg}); JSONL needs one object per line") from None
            if field_name not in rec:
                raise AttnscopeError(f"{path}:{i + 1} has no {field_name!r} field; each JSONL line needs a {field_name!r} string")
            docs.append((f"{path.name}:{i + 1}", str(rec[field_name])))
    return docs


def _read_file(path: Path) -> list[tuple[str, str]]:
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    return [(path.name, path.read_text(encoding="utf-8", errors="replace"))]


def open_source(spec: str | Path) -> TextSource:
    """Read a text source (see module docstring); raises a one-line error if it does not exist."""
    spec = str(spec)
    if spec.startswith("bundled:"):
        name = spec.split(":", 1)[1]
        p = bundled_dir() / f"{name}.txt"
        if not p.exists():
            raise AttnscopeError(f"no bundled text {name!r}; available: {', '.join(bundled_texts())}")
        return TextSource(spec, _read_file(p))
    if spec.startswith("hf:"):
        return _hf_dataset(spec)
    p = Path(spec).expanduser()
    if not p.exists():
        raise AttnscopeError(f"no such text file or folder: {spec}; pass a .txt/.jsonl file, a folder, or bundled:NAME")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
        if not files:
            raise AttnscopeError(f"folder {spec} holds no text files ({', '.join(TEXT_SUFFIXES)})")
        docs = [d for f in files for d in _read_file(f)]
    else:
        docs = _read_file(p)
    docs = [(n, t) for n, t in docs if t.strip()]
    if not docs:
        raise TextTooShortError(f"{spec} holds no text; pass a non-empty file")
    return TextSource(spec, docs)


def _hf_dataset(spec: str) -> TextSource:
    parts = spec[3:].split(":")
    name, config = parts[0], (parts[1] or None) if len(parts) > 1 else None
    split = parts[2] if len(parts) > 2 else "train"
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


def _cache_path(tokenizer, source: TextSource) -> Path:
    from .models import cache_dir

    tok_id = hashlib.sha256(
        (getattr(tokenizer, "name_or_path", "") + str(len(tokenizer)) + tokenizer.__class__.__name__).encode()
        + json.dumps(tokenizer.convert_ids_to_tokens(list(range(min(len(tokenizer), 2000))))).encode()
    ).hexdigest()[:12]
    return cache_dir() / "tokens" / f"{source.sha256[:16]}-{tok_id}.npy"


def tokenize(source: TextSource, tokenizer, *, cache: bool = True) -> np.ndarray:
    """All documents as one token stream (int64), joined with the end-of-text / separator token."""
    path = _cache_path(tokenizer, source)
    if cache and path.exists():
        return np.load(path)
    sep = _separator_id(tokenizer)
    chunks: list[list[int]] = []
    for _, text in source.documents:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        chunks.append(ids)
        if sep is not None and len(source.documents) > 1:
            chunks.append([sep])
    out = np.fromiter((i for c in chunks for i in c), dtype=np.int64)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, out)
        tmp.replace(path)
    return out


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
            "n_samples": n_samples, "seed": seed, "bos_token_id": bos_token_id}
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
