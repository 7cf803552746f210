"""The demo model's data: deterministic train/held-out split of each corpus file, tokenizer, windows.

Every ``*.txt`` file in the corpora folder is one "context" (label = file stem).  Each file is split
deterministically (:func:`split_corpus`): the last ~10% of its characters, cut at a line boundary, is
held out for evaluation and the rest is used for training.  A byte-level BPE tokenizer (GPT-2 style)
is trained on the train splits only (:func:`train_tokenizer`).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from attnscope.core.errors import AttnscopeError

__all__ = [
    "EOT_TOKEN",
    "EVAL_FRACTION",
    "split_corpus",
    "load_corpora",
    "corpus_sha256",
    "train_tokenizer",
    "encode_text",
    "eval_windows",
]

EOT_TOKEN = "<|endoftext|>"
EVAL_FRACTION = 0.1


def split_corpus(text: str, eval_fraction: float = EVAL_FRACTION) -> tuple[str, str]:
    """Split ``text`` into ``(train, eval)``; ``train + eval == text``.

    The cut is the last line boundary (just after a ``"\\n"``) at or before
    ``int(len(text) * (1 - eval_fraction))``, so the held-out part is the final ~``eval_fraction``
    of the characters (never less) and starts at the beginning of a line.  If there is no newline
    before that point the first one after it is used; without any usable newline the cut is made
    at the character position itself.  Purely a function of ``text``: deterministic.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError("eval_fraction must be in (0, 1)")
    n = len(text)
    if n == 0:
        return "", ""
    cut = int(n * (1.0 - eval_fraction))
    nl = text.rfind("\n", 0, cut)
    if nl == -1:
        nl = text.find("\n", cut)
    if nl == -1 or nl + 1 >= n:
        return text[:cut], text[cut:]
    return text[: nl + 1], text[nl + 1 :]


def _corpus_files(corpora_dir: str | Path) -> list[Path]:
    files = sorted(Path(corpora_dir).glob("*.txt"))
    if not files:
        raise AttnscopeError(f"no *.txt corpus files in {corpora_dir}; pass --corpora a folder of .txt files")
    return files


def _read_text(path: Path) -> str:
    # bytes -> str without newline translation, so the split is exactly reproducible
    return path.read_bytes().decode("utf-8")


def load_corpora(corpora_dir: str | Path, eval_fraction: float = EVAL_FRACTION) -> dict[str, tuple[str, str]]:
    """``{label: (train_text, eval_text)}`` for every ``*.txt`` in ``corpora_dir`` (sorted by label)."""
    return {p.stem: split_corpus(_read_text(p), eval_fraction) for p in _corpus_files(corpora_dir)}


def corpus_sha256(corpora_dir: str | Path) -> dict[str, str]:
    """sha256 hex digest of each corpus file, keyed by label."""
    return {p.stem: hashlib.sha256(p.read_bytes()).hexdigest() for p in _corpus_files(corpora_dir)}


# Positions where the GPT-2 pre-tokenizer regex always ends a piece and never lets the next piece
# depend on what came before: just after a "\n", or just before a " ", with non-whitespace on both
# sides.  (Python's \s is a superset of the Rust regex's \s, so this is conservative.)
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)|(?<=\S)(?= \S)")


def _safe_chunks(text: str, target: int = 1 << 16) -> list[str]:
    """Cut ``text`` into ~``target``-character pieces whose separate byte-level BPE encodings
    concatenate to the encoding of the whole text (enables parallel ``encode_batch``)."""
    chunks: list[str] = []
    start, n = 0, len(text)
    while n - start > target:
        m = _SAFE_CUT.search(text, start + target)
        if m is None:
            break
        chunks.append(text[start : m.start()])
        start = m.start()
    chunks.append(text[start:])
    return [c for c in chunks if c]


def prefix_at_line(text: str, max_chars: int | None) -> str:
    if max_chars is None or len(text) <= max_chars:
        return text
    nl = text.rfind("\n", 0, max_chars)
    return text[: nl + 1] if nl > 0 else text[:max_chars]


def train_tokenizer(texts: list[str], vocab_size: int = 4096, min_frequency: int = 2):
    """Train a GPT-2 style byte-level BPE ``tokenizers.Tokenizer``; ``<|endoftext|>`` gets id 0."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    chunks = [c for t in texts for c in _safe_chunks(t, 1 << 14)]
    tok.train_from_iterator(chunks, trainer=trainer, length=len(chunks))
    if tok.token_to_id(EOT_TOKEN) != 0:  # pragma: no cover - guaranteed by tokenizers
        raise RuntimeError("expected <|endoftext|> to have id 0")
    return tok


def encode_text(tokenizer, text: str) -> np.ndarray:
    """Token ids (int32) of ``text``, identical to ``tokenizer.encode(text)`` but parallel.

    ``tokenizer`` is a ``tokenizers.Tokenizer`` or anything with a ``backend_tokenizer``.
    """
    tok = getattr(tokenizer, "backend_tokenizer", tokenizer)
    chunks = _safe_chunks(text)
    if not chunks:
        return np.zeros(0, dtype=np.int32)
    encs = tok.encode_batch(chunks, add_special_tokens=False)
    return np.concatenate([np.asarray(e.ids, dtype=np.int32) for e in encs])


def eval_windows(ids: np.ndarray, n_ctx: int, max_windows: int) -> list[np.ndarray]:
    """Fixed, deterministic evaluation windows: non-overlapping ``n_ctx``-token windows of
    ``ids``; if there are more than ``max_windows``, an evenly spaced subset.  A text shorter than
    ``n_ctx`` gives one shorter window (if it has at least 2 tokens)."""
    n = len(ids)
    if n < 2:
        return []
    nwin = n // n_ctx
    if nwin == 0:
        return [ids]
    idx = np.arange(nwin)
    if nwin > max_windows:
        idx = np.unique(np.linspace(0, nwin - 1, max_windows).round().astype(np.int64))
    return [ids[i * n_ctx : (i + 1) * n_ctx] for i in idx]
