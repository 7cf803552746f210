"""Held-out evaluation of a language model on the corpora's eval splits, against unigram baselines."""

from __future__ import annotations

import numpy as np
import torch

from attnscope.training.corpora import eval_windows

__all__ = ["heldout_loss", "unigram_nll"]


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


def unigram_nll(counts: np.ndarray, targets: np.ndarray) -> float:
    """Summed NLL of ``targets`` under the add-one smoothed unigram distribution ``counts``."""
    logp = np.log(counts + 1.0) - np.log(counts.sum() + len(counts))
    return float(logp[targets].sum() * -1.0)


def _nan_mean(xs: list[float]) -> float:
    return float(np.mean(xs)) if xs else float("nan")


def heldout_loss(
    model, train_ids: dict[str, np.ndarray], eval_ids: dict[str, np.ndarray], n_ctx: int, max_windows: int
) -> dict:
    """``{"overall": ..., "per_corpus": {label: ...}}``: held-out loss (nats/token) per corpus and pooled.

    Windows: :func:`~attnscope.training.corpora.eval_windows` of each eval split (at most ``max_windows``
    per corpus).  Baselines on the same target tokens: ``unigram`` (add-one smoothed unigram of all train
    splits) and ``unigram_in_corpus`` (each corpus's own train unigram).
    """
    V = model.config.vocab_size
    counts = np.zeros(V, dtype=np.float64)
    for ids in train_ids.values():
        counts += np.bincount(ids, minlength=V)[:V]
    per_corpus: dict[str, dict] = {}
    tot = np.zeros(3)
    tot_n = 0
    for k in train_ids:
        wins = eval_windows(eval_ids[k], n_ctx, max_windows)
        if not wins:
            continue
        nll, n = _eval_loss(model, wins, batch_size=32)
        targets = np.concatenate([w[1:] for w in wins])
        uni = unigram_nll(counts, targets)
        uni_c = unigram_nll(np.bincount(train_ids[k], minlength=V)[:V].astype(np.float64), targets)
        per_corpus[k] = {"loss": nll / n, "unigram": uni / n, "unigram_in_corpus": uni_c / n,
                         "eval_tokens": n, "eval_windows": len(wins)}
        tot += (nll, uni, uni_c)
        tot_n += n
    nan = float("nan")
    overall = {
        "loss": float(tot[0] / tot_n) if tot_n else nan,
        "unigram": float(tot[1] / tot_n) if tot_n else nan,
        "unigram_in_corpus": float(tot[2] / tot_n) if tot_n else nan,
        "eval_tokens": tot_n,
        "loss_macro": _nan_mean([v["loss"] for v in per_corpus.values()]),
        "unigram_macro": _nan_mean([v["unigram"] for v in per_corpus.values()]),
        "eval_max_windows_per_corpus": max_windows,
    }
    return {"overall": overall, "per_corpus": per_corpus}
