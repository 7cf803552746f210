"""Train attnscope's small GPT-2-architecture demo model on the labelled corpora.

A ``GPT2LMHeadModel`` is trained on random ``n_ctx``-token windows of the train splits (corpus chosen
with probability proportional to sqrt(#tokens), each window from one file), evaluated on fixed windows
of the held-out splits against a unigram baseline, and saved as a normal Hugging Face folder (float16
safetensors + tokenizer + ``training.json``).  With ``save_every`` the run also keeps checkpoints
``OUT/step-NNNNNN/`` (same layout, ``training.json`` records step, tokens seen and held-out loss).

One entry point: :func:`train_demo` with a :class:`TrainConfig` (the CLI is ``attnscope train-demo``).
"""

from __future__ import annotations

import copy
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import tokenizers
import torch

from attnscope.core.errors import AttnscopeError
from attnscope.training.corpora import (
    EOT_TOKEN,
    EVAL_FRACTION,
    corpus_sha256,
    encode_text,
    load_corpora,
    prefix_at_line,
    train_tokenizer,
)
from attnscope.training.evaluate import heldout_loss

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = ["TrainConfig", "train_demo", "checkpoint_dir"]


@dataclass
class TrainConfig:
    """Everything that determines a training run (same config + seed + ``steps`` = same weights)."""

    corpora: Path
    out: Path
    seed: int = 0
    max_minutes: float = 20.0  # wall-clock budget when ``steps`` is None
    steps: int | None = None  # fixed number of optimizer steps (reproducible); overrides max_minutes
    save_every: int | None = None  # keep a checkpoint every N steps (plus step 0 and the last step)
    checkpoint_eval_windows: int = 16  # held-out windows per corpus for each checkpoint's loss
    vocab_size: int = 4096
    n_layer: int = 4
    n_embd: int = 192
    n_head: int = 8
    n_ctx: int = 256
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    eval_max_windows: int = 128  # held-out windows per corpus for the final model
    amp: str = "auto"  # "auto" (bf16 autocast if the CPU supports it), "bf16" or "none"
    tokenizer_max_chars: int | None = 2_000_000
    threads: int | None = None  # torch threads for this call (restored after); None = leave as is
    progress: bool = True
    publish_to: Path | None = None  # the final folder, recorded in training.json, when ``out`` is a staging folder

    def __post_init__(self) -> None:
        self.corpora, self.out = Path(self.corpora), Path(self.out)
        if self.amp not in ("auto", "bf16", "none"):
            raise AttnscopeError(f"amp must be auto, bf16 or none, not {self.amp!r}")
        for name in ("steps", "save_every", "threads"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise AttnscopeError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
        if self.save_every is not None and self.steps is None:
            raise AttnscopeError("--save-every needs --steps (checkpoints at fixed steps keep a series reproducible)")
        self._check_numbers()

    def _check_numbers(self) -> None:
        """Finite, bounded settings only: nan, inf or 0 would train nothing, crash mid-run or save garbage."""
        bounds = {"lr": (0.0, 1.0), "max_minutes": (0.0, 7 * 24 * 60.0)}
        for name, (lo, hi) in bounds.items():
            v = getattr(self, name)
            if not (math.isfinite(v) and lo < v <= hi):
                raise AttnscopeError(f"--{name.replace('_', '-')} {v} must be a finite number above {lo:g} and at most "
                                     f"{hi:g}")
        ints = {"batch_size": (1, 4096), "n_ctx": (8, 8192), "n_embd": (self.n_head, 8192)}
        for name, (lo, hi) in ints.items():
            v = getattr(self, name)
            if not lo <= v <= hi:
                raise AttnscopeError(f"--{name.replace('_', '-')} {v} is outside {lo}..{hi}; pass a value in it")
        if self.n_embd % self.n_head:
            raise AttnscopeError(f"--n-embd {self.n_embd} is not divisible by the model's {self.n_head} attention "
                                 f"heads; pass a multiple of {self.n_head} "
                                 f"(e.g. {self.n_embd // self.n_head * self.n_head or self.n_head})")


def checkpoint_dir(out: Path, step: int) -> Path:
    """Folder of the checkpoint after ``step`` optimizer steps: ``OUT/step-000200``."""
    return Path(out) / f"step-{step:06d}"


@dataclass
class _Data:
    labels: list[str]
    corpora: dict[str, tuple[str, str]]
    shas: dict[str, str]
    tokenizer: tokenizers.Tokenizer
    hf_tokenizer: PreTrainedTokenizerFast
    train_ids: dict[str, np.ndarray]
    eval_ids: dict[str, np.ndarray]
    usable: list[str]
    probs: np.ndarray


@dataclass
class _State:
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    rng: np.random.Generator
    warmup: int
    use_bf16: bool
    t0: float
    step: int = 0
    tokens_seen: int = 0
    losses: list[float] = field(default_factory=list)
    curve: list[dict] = field(default_factory=list)
    checkpoints: list[dict] = field(default_factory=list)


def _bf16_supported() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # pragma: no cover
        return False


def _lr_factor(step: int, progress: float, warmup_steps: int, min_ratio: float) -> float:
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    p = min(max(progress, 0.0), 1.0)
    return warm * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p)))


def _logger(cfg: TrainConfig, t0: float):
    def log(msg: str) -> None:
        if cfg.progress:
            print(f"[train-demo {time.time() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)
    return log


def _prepare_data(cfg: TrainConfig, log) -> _Data:
    from transformers import PreTrainedTokenizerFast

    corpora = load_corpora(cfg.corpora)
    labels = list(corpora)
    log(f"{len(labels)} corpora: {', '.join(labels)}")
    tok = train_tokenizer([prefix_at_line(tr, cfg.tokenizer_max_chars) for tr, _ in corpora.values()], cfg.vocab_size)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT_TOKEN, eos_token=EOT_TOKEN,
                                     unk_token=EOT_TOKEN, model_max_length=cfg.n_ctx,
                                     clean_up_tokenization_spaces=False)
    log(f"tokenizer trained: vocab {tok.get_vocab_size()}")
    train_ids = {k: encode_text(tok, tr) for k, (tr, _) in corpora.items()}
    eval_ids = {k: encode_text(tok, ev) for k, (_, ev) in corpora.items()}
    usable = [k for k in labels if len(train_ids[k]) > 1]
    if not usable:
        raise AttnscopeError(f"the train splits in {cfg.corpora} are too short; give longer .txt files")
    sizes = np.array([len(train_ids[k]) for k in usable], dtype=np.float64)
    probs = np.sqrt(sizes) / np.sqrt(sizes).sum()
    log("train tokens: " + ", ".join(f"{k}={len(train_ids[k])}" for k in labels))
    return _Data(labels, corpora, corpus_sha256(cfg.corpora), tok, hf_tok, train_ids, eval_ids, usable, probs)


def _build_state(cfg: TrainConfig, data: _Data, t0: float) -> _State:
    from transformers import GPT2Config, GPT2LMHeadModel

    eot_id = data.tokenizer.token_to_id(EOT_TOKEN)
    config = GPT2Config(
        vocab_size=data.tokenizer.get_vocab_size(), n_positions=cfg.n_ctx, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=eot_id, eos_token_id=eot_id, tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(config)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    warm = cfg.warmup_steps if cfg.steps is None else max(1, min(cfg.warmup_steps, cfg.steps // 10))
    use_bf16 = cfg.amp == "bf16" or (cfg.amp == "auto" and _bf16_supported())
    return _State(model, opt, np.random.default_rng(cfg.seed), warm, use_bf16, t0)


def _sample_batch(cfg: TrainConfig, data: _Data, rng: np.random.Generator) -> torch.Tensor:
    """``[batch, n_ctx]`` token ids: one random window of one corpus (p ~ sqrt(tokens)) per row."""
    which = rng.choice(len(data.usable), size=cfg.batch_size, p=data.probs)
    rows = []
    for c in which:
        ids = data.train_ids[data.usable[c]]
        L = min(cfg.n_ctx, len(ids))
        start = int(rng.integers(0, len(ids) - L + 1))
        rows.append(ids[start : start + L])
    if len({len(r) for r in rows}) > 1:  # only for corpora shorter than n_ctx (tiny tests)
        L = min(len(r) for r in rows)
        rows = [r[:L] for r in rows]
    return torch.from_numpy(np.stack(rows).astype(np.int64))


def _train_step(cfg: TrainConfig, st: _State, x: torch.Tensor, lr: float) -> float:
    for g in st.opt.param_groups:
        g["lr"] = lr
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=st.use_bf16):
        loss = st.model(input_ids=x, labels=x).loss
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss at step {st.step}")
    st.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(st.model.parameters(), 1.0)
    st.opt.step()
    return float(loss.detach())


def _record_loss(st: _State, lv: float, log_every: int = 10) -> None:
    st.losses.append(lv)
    if st.step == 0:
        st.curve.append({"step": 0, "loss": lv})
    elif (st.step + 1) % log_every == 0:
        st.curve.append({"step": st.step + 1, "loss": float(np.mean(st.losses[-log_every:]))})


def _train(cfg: TrainConfig, data: _Data, st: _State, log) -> float:
    """Run the optimizer steps (until ``steps`` or the time budget); returns the training time in s."""
    t_train = time.time()
    budget = max(0.0, cfg.max_minutes * 60.0 - (t_train - st.t0))
    st.model.train()
    _maybe_checkpoint(cfg, data, st, log)
    while True:
        elapsed = time.time() - t_train
        if cfg.steps is not None:
            if st.step >= cfg.steps:
                break
            prog = st.step / cfg.steps
        else:
            if elapsed >= budget and st.step > 0:
                break
            prog = elapsed / budget if budget > 0 else 1.0
        lr = cfg.lr * _lr_factor(st.step, prog, st.warmup, cfg.min_lr_ratio)
        x = _sample_batch(cfg, data, st.rng)
        _record_loss(st, _train_step(cfg, st, x, lr))
        st.tokens_seen += int(x.numel())
        st.step += 1
        if st.step % 200 == 0:
            el = time.time() - t_train
            log(f"step {st.step}: loss {np.mean(st.losses[-50:]):.3f} lr {lr:.2e} "
                f"{st.tokens_seen / max(el, 1e-9):.0f} tok/s")
        _maybe_checkpoint(cfg, data, st, log)
    if st.curve[-1]["step"] != st.step and st.step > 1:
        st.curve.append({"step": st.step, "loss": float(np.mean(st.losses[st.curve[-1]["step"]:]))})
    return time.time() - t_train


def _maybe_checkpoint(cfg: TrainConfig, data: _Data, st: _State, log) -> None:
    """Save ``OUT/step-NNNNNN`` at step 0, every ``save_every`` steps and at the last step.

    The checkpoint is the float16-rounded copy of the weights (what a normal save ships); its held-out
    loss uses ``checkpoint_eval_windows`` windows per corpus.  Training itself is not disturbed: no random
    number is drawn and the float32 master weights stay as they are.
    """
    if cfg.save_every is None or not (st.step % cfg.save_every == 0 or st.step == cfg.steps):
        return
    t = time.time()
    snap = copy.deepcopy(st.model).to(torch.float16).to(torch.float32).eval()
    ev = heldout_loss(snap, data.train_ids, data.eval_ids, cfg.n_ctx, cfg.checkpoint_eval_windows)
    folder = checkpoint_dir(cfg.out, st.step)
    info = _info(cfg, data, st, snap, ev, {"train_time_s": None, "eval_time_s": time.time() - t})
    _save(snap, data, folder, info)
    st.checkpoints.append({"step": st.step, "tokens_seen": st.tokens_seen, "path": folder.name,
                           "heldout_loss": ev["overall"]["loss"]})
    log(f"checkpoint {folder.name}: held-out loss {ev['overall']['loss']:.3f} ({time.time() - t:.1f}s)")
    st.model.train()


def _save(model, data: _Data, folder: Path, info: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(folder)
    data.hf_tokenizer.save_pretrained(folder)
    (folder / "training.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def train_demo(cfg: TrainConfig) -> dict:
    """Train the demo model and save it to ``cfg.out``; returns the ``training.json`` dict.

    Training stops after ``cfg.steps`` optimizer steps if given, otherwise when ``max_minutes`` of wall
    clock (counted from the call, so tokenizer training and data preparation are included) are used.
    The cosine learning-rate decay runs over ``steps`` or, without it, over the wall-clock budget; warmup
    is linear over the first ``warmup_steps`` steps (at most 10% of ``steps``).  Master weights,
    optimizer state and evaluation are float32; the final evaluation runs on the float16-rounded weights
    that are saved.  ``cfg.threads`` sets torch's thread count for this call only.
    """
    old_threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _train_demo(cfg)
    finally:
        torch.set_num_threads(old_threads)


def _train_demo(cfg: TrainConfig) -> dict:
    t0 = time.time()
    cfg.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    log = _logger(cfg, t0)
    data = _prepare_data(cfg, log)
    st = _build_state(cfg, data, t0)
    log(f"model: {sum(p.numel() for p in st.model.parameters()) / 1e6:.2f}M params, bf16 autocast={st.use_bf16}, "
        f"batch {cfg.batch_size}x{cfg.n_ctx}, lr {cfg.lr}")
    train_time = _train(cfg, data, st, log)
    log(f"training done: {st.step} steps, {st.tokens_seen} tokens, {train_time:.0f}s")
    t_eval = time.time()
    model = st.model.to(torch.float16).to(torch.float32).eval()
    ev = heldout_loss(model, data.train_ids, data.eval_ids, cfg.n_ctx, cfg.eval_max_windows)
    log(f"held-out loss {ev['overall']['loss']:.3f} nats/token vs unigram {ev['overall']['unigram']:.3f}")
    info = _info(cfg, data, st, model, ev, {"train_time_s": train_time, "eval_time_s": time.time() - t_eval})
    _save(model, data, cfg.out, info)
    log(f"saved to {cfg.publish_to or cfg.out} ({info['wall_time_s']:.0f}s total)")
    return info


def _info(cfg: TrainConfig, data: _Data, st: _State, model, ev: dict, times: dict) -> dict:
    """The ``training.json`` record of the model in ``st`` after ``st.step`` steps."""
    import transformers

    wall = time.time() - st.t0
    train_time = times["train_time_s"]
    prob_of = dict(zip(data.usable, data.probs.tolist()))
    return {
        "config": _config_record(cfg, data, st, model),
        "seed": cfg.seed,
        "steps": st.step,
        "step": st.step,
        "tokens_seen": st.tokens_seen,
        "wall_time_s": wall,
        **times,
        "throughput_tokens_per_s": st.tokens_seen / train_time if train_time else None,
        "final_train_loss": float(np.mean(st.losses[-20:])) if st.losses else None,
        "loss_curve": st.curve,
        "eval": ev,
        "heldout_loss": ev["overall"]["loss"],
        "checkpoints": list(st.checkpoints),
        "corpora": {
            k: {"sha256": data.shas[k], "train_chars": len(data.corpora[k][0]), "eval_chars": len(data.corpora[k][1]),
                "train_tokens": int(len(data.train_ids[k])), "eval_tokens_total": int(len(data.eval_ids[k])),
                "sampling_prob": prob_of.get(k, 0.0)}
            for k in data.labels
        },
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                     "numpy": np.__version__},
    }


def _config_record(cfg: TrainConfig, data: _Data, st: _State, model) -> dict:
    V = data.tokenizer.get_vocab_size()
    run = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "publish_to"}
    run["out"] = str(cfg.publish_to or cfg.out)
    return {
        "model": {"architecture": "GPT2LMHeadModel", "vocab_size": V, "n_positions": cfg.n_ctx, "n_ctx": cfg.n_ctx,
                  "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "activation_function": "gelu_new",
                  "dropout": 0.0, "tie_word_embeddings": True, "n_params": sum(p.numel() for p in model.parameters()),
                  "saved_dtype": "float16"},
        "tokenizer": {"type": "byte-level BPE", "vocab_size_requested": cfg.vocab_size, "vocab_size": V,
                      "special_tokens": {EOT_TOKEN: data.tokenizer.token_to_id(EOT_TOKEN)}, "add_prefix_space": False,
                      "max_train_chars_per_corpus": cfg.tokenizer_max_chars},
        "training": {
            "optimizer": "AdamW", "betas": [0.9, 0.95], "weight_decay": cfg.weight_decay, "lr": cfg.lr,
            "schedule": "linear warmup + cosine decay over "
                        + ("steps" if cfg.steps is not None else "wall-clock budget"),
            "warmup_steps": st.warmup, "min_lr_ratio": cfg.min_lr_ratio, "grad_clip": 1.0,
            "batch_size": cfg.batch_size, "seq_len": cfg.n_ctx, "bf16_autocast": st.use_bf16,
            "max_minutes": cfg.max_minutes, "steps_requested": cfg.steps, "save_every": cfg.save_every,
            "corpus_sampling": "p ~ sqrt(train tokens), one window per file", "eval_fraction": EVAL_FRACTION,
            "eval_max_windows_per_corpus": cfg.eval_max_windows, "torch_threads": torch.get_num_threads(),
        },
        "run": run,
    }
