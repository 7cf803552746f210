"""Train attnscope's small GPT-2-architecture demo model on the bundled corpora.

Every ``*.txt`` file in the corpora folder is one "context" (label = file stem).  Each file is
split deterministically (:func:`split_corpus`): the last ~10% of its characters, cut at a line
boundary, is held out for evaluation and the rest is used for training.  A byte-level BPE
tokenizer (GPT-2 style) is trained on the train splits only, then a ``GPT2LMHeadModel`` is trained
on random ``n_ctx``-token windows sampled from the train splits (corpus chosen with probability
proportional to sqrt(#tokens), each window from one file), evaluated on fixed windows of the
held-out splits against a unigram baseline, and saved (float16 safetensors + tokenizer +
``training.json``).

Command line::

    python -m attnscope.train --corpora /work/shared/corpora --out src/attnscope/assets/demo \
        --max-minutes 20

This module only depends on torch, transformers, tokenizers, numpy and the standard library.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "EOT_TOKEN",
    "EVAL_FRACTION",
    "split_corpus",
    "load_corpora",
    "corpus_sha256",
    "train_tokenizer",
    "encode_text",
    "eval_windows",
    "train_demo",
    "main",
]

EOT_TOKEN = "<|endoftext|>"
EVAL_FRACTION = 0.1


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


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
        raise FileNotFoundError(f"no *.txt corpus files in {corpora_dir}")
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


def _prefix_at_line(text: str, max_chars: int | None) -> str:
    if max_chars is None or len(text) <= max_chars:
        return text
    nl = text.rfind("\n", 0, max_chars)
    return text[: nl + 1] if nl > 0 else text[:max_chars]


def train_tokenizer(texts: list[str], vocab_size: int = 4096, min_frequency: int = 2):
    """Train a GPT-2 style byte-level BPE ``tokenizers.Tokenizer``; ``<|endoftext|>`` gets id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

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


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


def _bf16_supported() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # pragma: no cover
        return False


def _lr_factor(step: int, progress: float, warmup_steps: int, min_ratio: float) -> float:
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    p = min(max(progress, 0.0), 1.0)
    return warm * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p)))


@torch.no_grad()
def _eval_loss(model, windows: list[np.ndarray], batch_size: int) -> tuple[float, int]:
    """Summed next-token cross-entropy (nats) and number of predicted tokens (float32)."""
    model.eval()
    total, count = 0.0, 0
    by_len: dict[int, list[np.ndarray]] = {}
    for w in windows:
        by_len.setdefault(len(w), []).append(w)
    for ws in by_len.values():
        for i in range(0, len(ws), batch_size):
            x = torch.from_numpy(np.stack(ws[i : i + batch_size]).astype(np.int64))
            logits = model(input_ids=x).logits.float()
            lp = torch.log_softmax(logits[:, :-1], dim=-1)
            nll = -lp.gather(-1, x[:, 1:, None]).squeeze(-1)
            total += float(nll.sum(dtype=torch.float64))
            count += int(nll.numel())
    return total, count


def _unigram_nll(counts: np.ndarray, targets: np.ndarray) -> float:
    """Summed NLL of ``targets`` under the add-one smoothed unigram distribution ``counts``."""
    logp = np.log(counts + 1.0) - np.log(counts.sum() + len(counts))
    return float(logp[targets].sum() * -1.0)


def train_demo(
    corpora_dir: str | Path,
    out_dir: str | Path,
    *,
    seed: int = 0,
    max_minutes: float = 20.0,
    steps: int | None = None,
    vocab_size: int = 4096,
    n_layer: int = 4,
    n_embd: int = 192,
    n_head: int = 8,
    n_ctx: int = 256,
    batch_size: int = 16,
    lr: float = 3e-3,
    progress: bool = True,
    warmup_steps: int = 100,
    min_lr_ratio: float = 0.1,
    weight_decay: float = 0.1,
    eval_max_windows: int = 128,
    amp: str = "auto",
    tokenizer_max_chars: int | None = 2_000_000,
) -> dict:
    """Train the demo model and save it to ``out_dir``; returns the ``training.json`` dict.

    Training stops after ``steps`` optimizer steps if given, otherwise when ``max_minutes`` of wall
    clock (counted from the call, so tokenizer training and data preparation are included) are
    used; the final evaluation and saving come on top (typically well under a minute).  The cosine
    learning-rate decay runs over ``steps`` or, without it, over the wall-clock budget; warmup is
    linear over the first ``warmup_steps`` steps (at most 10% of ``steps``).

    ``amp``: ``"auto"`` (bfloat16 autocast for the training forward/backward when the CPU supports
    it), ``"bf16"`` or ``"none"``.  Master weights, optimizer state and evaluation are float32.
    ``tokenizer_max_chars`` caps how many train characters of each corpus the BPE tokenizer is
    trained on (balances the vocabulary between big English files and small ones); ``None`` = all.
    """
    from tqdm.auto import tqdm
    import tokenizers
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    t0 = time.time()
    budget_s = max_minutes * 60.0
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    torch.set_num_threads(2)

    def log(msg: str) -> None:
        if progress:
            tqdm.write(f"[train_demo {time.time() - t0:7.1f}s] {msg}", file=sys.stderr)

    if amp not in ("auto", "bf16", "none"):
        raise ValueError("amp must be 'auto', 'bf16' or 'none'")
    use_bf16 = amp == "bf16" or (amp == "auto" and _bf16_supported())

    # ---- data + tokenizer -------------------------------------------------------------------
    corpora = load_corpora(corpora_dir)
    shas = corpus_sha256(corpora_dir)
    labels = list(corpora)
    log(f"{len(labels)} corpora: {', '.join(labels)}")

    tok = train_tokenizer([_prefix_at_line(tr, tokenizer_max_chars) for tr, _ in corpora.values()], vocab_size)
    V = tok.get_vocab_size()
    eot_id = tok.token_to_id(EOT_TOKEN)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT_TOKEN,
        eos_token=EOT_TOKEN,
        unk_token=EOT_TOKEN,
        model_max_length=n_ctx,
        clean_up_tokenization_spaces=False,
    )
    log(f"tokenizer trained: vocab {V}")

    train_ids = {k: encode_text(tok, tr) for k, (tr, _) in corpora.items()}
    eval_ids = {k: encode_text(tok, ev) for k, (_, ev) in corpora.items()}
    usable = [k for k in labels if len(train_ids[k]) > 1]
    if not usable:
        raise ValueError("train splits are too short")
    sizes = np.array([len(train_ids[k]) for k in usable], dtype=np.float64)
    probs = np.sqrt(sizes) / np.sqrt(sizes).sum()
    log("train tokens: " + ", ".join(f"{k}={len(train_ids[k])}" for k in labels))

    # ---- model --------------------------------------------------------------------------------
    config = GPT2Config(
        vocab_size=V,
        n_positions=n_ctx,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(config)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    warm = warmup_steps if steps is None else max(1, min(warmup_steps, steps // 10))
    log(f"model: {n_params / 1e6:.2f}M params, bf16 autocast={use_bf16}, batch {batch_size}x{n_ctx}, lr {lr}")

    def sample_batch() -> torch.Tensor:
        which = rng.choice(len(usable), size=batch_size, p=probs)
        rows = []
        for c in which:
            ids = train_ids[usable[c]]
            L = min(n_ctx, len(ids))
            start = int(rng.integers(0, len(ids) - L + 1))
            rows.append(ids[start : start + L])
        if len({len(r) for r in rows}) > 1:  # only for corpora shorter than n_ctx (tiny tests)
            L = min(len(r) for r in rows)
            rows = [r[:L] for r in rows]
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    # ---- train --------------------------------------------------------------------------------
    t_train = time.time()
    train_budget = max(0.0, budget_s - (t_train - t0))
    losses: list[float] = []
    curve: list[dict] = []
    log_every = 10
    step = 0
    tokens_seen = 0
    ema = None
    bar = tqdm(total=steps, disable=not progress, mininterval=2.0, desc="train", unit="step", file=sys.stderr)
    model.train()
    while True:
        elapsed = time.time() - t_train
        if steps is not None:
            if step >= steps:
                break
            prog = step / steps
        else:
            if elapsed >= train_budget and step > 0:
                break
            prog = elapsed / train_budget if train_budget > 0 else 1.0
        cur_lr = lr * _lr_factor(step, prog, warm, min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = cur_lr
        x = sample_batch()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            out = model(input_ids=x, labels=x)
        loss = out.loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lv = float(loss.detach())
        losses.append(lv)
        if step == 0:
            curve.append({"step": 0, "loss": lv})
        elif (step + 1) % log_every == 0:
            curve.append({"step": step + 1, "loss": float(np.mean(losses[-log_every:]))})
        tokens_seen += int(x.numel())
        step += 1
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        bar.update(1)
        if progress:
            el = time.time() - t_train
            bar.set_postfix(loss=f"{ema:.3f}", lr=f"{cur_lr:.2e}", tok_s=f"{tokens_seen / max(el, 1e-9):.0f}",
                            refresh=False)
            if step % 200 == 0:
                log(f"step {step}: loss(ema) {ema:.3f} lr {cur_lr:.2e} tokens {tokens_seen} "
                    f"{tokens_seen / max(el, 1e-9):.0f} tok/s")
    bar.close()
    train_time = time.time() - t_train
    if curve[-1]["step"] != step and step > 1:
        tail = losses[curve[-1]["step"] :]
        curve.append({"step": step, "loss": float(np.mean(tail))})
    log(f"training done: {step} steps, {tokens_seen} tokens, {train_time:.0f}s")

    # ---- evaluate (on the float16-rounded weights that are shipped) --------------------------
    t_eval = time.time()
    model = model.to(torch.float16).to(torch.float32)
    model.eval()
    counts = np.zeros(V, dtype=np.float64)
    for ids in train_ids.values():
        counts += np.bincount(ids, minlength=V)[:V]
    per_corpus: dict[str, dict] = {}
    tot_nll = tot_uni = tot_uni_c = 0.0
    tot_n = 0
    for k in labels:
        wins = eval_windows(eval_ids[k], n_ctx, eval_max_windows)
        if not wins:
            continue
        nll, n = _eval_loss(model, wins, batch_size=32)
        targets = np.concatenate([w[1:] for w in wins])
        uni = _unigram_nll(counts, targets)
        c_counts = np.bincount(train_ids[k], minlength=V)[:V].astype(np.float64)
        uni_c = _unigram_nll(c_counts, targets)
        per_corpus[k] = {
            "loss": nll / n,
            "unigram": uni / n,
            "unigram_in_corpus": uni_c / n,
            "eval_tokens": n,
            "eval_windows": len(wins),
        }
        tot_nll += nll
        tot_uni += uni
        tot_uni_c += uni_c
        tot_n += n
    overall = {
        "loss": tot_nll / tot_n if tot_n else float("nan"),
        "unigram": tot_uni / tot_n if tot_n else float("nan"),
        "unigram_in_corpus": tot_uni_c / tot_n if tot_n else float("nan"),
        "eval_tokens": tot_n,
        "loss_macro": float(np.mean([v["loss"] for v in per_corpus.values()])) if per_corpus else float("nan"),
        "unigram_macro": float(np.mean([v["unigram"] for v in per_corpus.values()])) if per_corpus else float("nan"),
    }
    eval_time = time.time() - t_eval
    log(f"held-out loss {overall['loss']:.3f} nats/token vs unigram {overall['unigram']:.3f}")

    # ---- save ---------------------------------------------------------------------------------
    model = model.to(torch.float16)
    model.save_pretrained(out_dir)
    hf_tok.save_pretrained(out_dir)
    wall = time.time() - t0
    prob_of = dict(zip(usable, probs.tolist()))
    info = {
        "config": {
            "model": {
                "architecture": "GPT2LMHeadModel",
                "vocab_size": V,
                "n_positions": n_ctx,
                "n_ctx": n_ctx,
                "n_embd": n_embd,
                "n_layer": n_layer,
                "n_head": n_head,
                "activation_function": "gelu_new",
                "dropout": 0.0,
                "tie_word_embeddings": True,
                "n_params": n_params,
                "saved_dtype": "float16",
            },
            "tokenizer": {
                "type": "byte-level BPE",
                "vocab_size_requested": vocab_size,
                "vocab_size": V,
                "special_tokens": {EOT_TOKEN: eot_id},
                "add_prefix_space": False,
                "max_train_chars_per_corpus": tokenizer_max_chars,
            },
            "training": {
                "optimizer": "AdamW",
                "betas": [0.9, 0.95],
                "weight_decay": weight_decay,
                "lr": lr,
                "schedule": "linear warmup + cosine decay over "
                + ("steps" if steps is not None else "wall-clock budget"),
                "warmup_steps": warm,
                "min_lr_ratio": min_lr_ratio,
                "grad_clip": 1.0,
                "batch_size": batch_size,
                "seq_len": n_ctx,
                "bf16_autocast": use_bf16,
                "max_minutes": max_minutes,
                "steps_requested": steps,
                "corpus_sampling": "p ~ sqrt(train tokens), one window per file",
                "eval_fraction": EVAL_FRACTION,
                "eval_max_windows_per_corpus": eval_max_windows,
                "torch_threads": torch.get_num_threads(),
            },
        },
        "seed": seed,
        "steps": step,
        "tokens_seen": tokens_seen,
        "wall_time_s": wall,
        "train_time_s": train_time,
        "eval_time_s": eval_time,
        "throughput_tokens_per_s": tokens_seen / train_time if train_time > 0 else None,
        "final_train_loss": float(np.mean(losses[-20:])),
        "loss_curve": curve,
        "eval": {"overall": overall, "per_corpus": per_corpus},
        "corpora": {
            k: {
                "sha256": shas[k],
                "train_chars": len(corpora[k][0]),
                "eval_chars": len(corpora[k][1]),
                "train_tokens": int(len(train_ids[k])),
                "eval_tokens_total": int(len(eval_ids[k])),
                "sampling_prob": prob_of.get(k, 0.0),
            }
            for k in labels
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "numpy": np.__version__,
        },
    }
    (out_dir / "training.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    log(f"saved to {out_dir} ({wall:.0f}s total)")
    return info


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m attnscope.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpora", required=True, help="folder of *.txt corpus files")
    ap.add_argument("--out", required=True, help="output folder (model, tokenizer, training.json)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-minutes", type=float, default=20.0)
    ap.add_argument("--steps", type=int, default=None, help="fixed number of steps (overrides --max-minutes)")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=192)
    ap.add_argument("--n-head", type=int, default=8)
    ap.add_argument("--n-ctx", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup-steps", type=int, default=100)
    ap.add_argument("--amp", choices=["auto", "bf16", "none"], default="auto")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    info = train_demo(
        a.corpora,
        a.out,
        seed=a.seed,
        max_minutes=a.max_minutes,
        steps=a.steps,
        vocab_size=a.vocab_size,
        n_layer=a.n_layer,
        n_embd=a.n_embd,
        n_head=a.n_head,
        n_ctx=a.n_ctx,
        batch_size=a.batch_size,
        lr=a.lr,
        warmup_steps=a.warmup_steps,
        amp=a.amp,
        progress=not a.no_progress,
    )
    ov = info["eval"]["overall"]
    print(json.dumps({"steps": info["steps"], "tokens_seen": info["tokens_seen"],
                      "wall_time_s": round(info["wall_time_s"], 1), "heldout_loss": round(ov["loss"], 4),
                      "unigram": round(ov["unigram"], 4)}))
    return info


if __name__ == "__main__":
    main()
