r"""One user text through the model and the explanation: true vs predicted pre-activation, evidence, scope.

A text longer than the circuit's context ``T`` is analysed in windows of ``T`` tokens (BOS in front of
each when the model prepends one).  Consecutive windows overlap by ``min_position`` tokens and each
token is reported once, from the window where it has the most context, so after the first window every
reported position has at least ``min_position`` tokens before it (the kernel's warm-up).  Positions
``n < min_position`` of the first window are *early*: outside the explanation's stated scope.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from attnscope.circuit.build import Circuit
from attnscope.core.errors import AttnscopeError, IndexOutOfRangeError, TextTooShortError, check_index
from attnscope.core.stats import cohens_d
from attnscope.exact.forward import iter_layers
from attnscope.models import ModelWeights
from attnscope.serve.explanation import Evidence, Explanation
from attnscope.serve.limits import (  # noqa: F401 (MAX_CHARS re-exported)
    MAX_ATTENTION_TOKENS,
    MAX_CHARS,
    MAX_TOKENS,
    WINDOW_BATCH_BYTES,
    check_text,
    check_tokens,
    precheck_tokens,
)
from attnscope.serve.scope import (
    CalibrationReference,
    InputCondition,
    ScopeSettings,
    WindowStats,
    evaluate_scope,
    window_stats,
)


class EmptyTextError(TextTooShortError):
    """The user's text holds no tokens."""

    http_status = 400


@dataclass
class Tokens:
    ids: Int[Tensor, " N"]  # the text's tokens (no BOS)
    strings: list[str]  # [N] each token's text, as it appears in the input where the tokenizer gives offsets


@dataclass
class Window:
    start: int  # first text token in the window
    stop: int  # one past the last text token
    report_from: int  # first text token reported from this window


@dataclass
class Moments:
    """Running sums of true and predicted pre-activations of every neuron over a text's positions: what the
    contrast needs, without keeping a ``[N, d_mlp]`` array (one request's memory stays bounded)."""

    n: Float[Tensor, " 2"]  # positions counted: [early, in scope]
    sum_true: Float[Tensor, "2 d_mlp"]
    sq_true: Float[Tensor, "2 d_mlp"]
    sum_pred: Float[Tensor, "2 d_mlp"]
    sq_pred: Float[Tensor, "2 d_mlp"]

    @classmethod
    def zeros(cls, d_mlp: int) -> "Moments":
        z = lambda: torch.zeros(2, d_mlp, dtype=torch.float64)  # noqa: E731
        return cls(torch.zeros(2, dtype=torch.float64), z(), z(), z(), z())

    def add(self, true: Float[Tensor, "n d_mlp"], pred: Float[Tensor, "n d_mlp"], early: Bool[Tensor, " n"]) -> None:
        for j, m in enumerate((early, ~early)):
            t, p = true[m].double(), pred[m].double()
            self.n[j] += t.shape[0]
            self.sum_true[j] += t.sum(0)
            self.sq_true[j] += (t * t).sum(0)
            self.sum_pred[j] += p.sum(0)
            self.sq_pred[j] += (p * p).sum(0)

    def stats(self) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
        """Means and (unbiased) variances ``[d_mlp]`` of true and predicted pre-activations over the in-scope
        positions (all positions when none is in scope), and the number of positions."""
        sel = [1] if self.n[1] > 0 else [0, 1]
        n = float(self.n[sel].sum())
        out = []
        for s_, q in ((self.sum_true, self.sq_true), (self.sum_pred, self.sq_pred)):
            mu = s_[sel].sum(0) / n
            var = ((q[sel].sum(0) - n * mu * mu) / (n - 1)).clamp_min(0) if n > 1 else torch.zeros_like(mu)
            out += [mu, var]
        return out[0], out[1], out[2], out[3], int(n)


@dataclass
class TextAnalysis:
    """True and predicted pre-activations of the asked-for layer-0 neurons on one text, and its scope."""

    tokens: Tokens
    windows: list[Window]
    local_position: Int[Tensor, " N"]  # each reported token's position inside its window (BOS counted)
    true: Float[Tensor, "N k"]  # columns: ``neurons`` (every neuron, in order, when all were asked for)
    pred: Float[Tensor, "N k"]
    conditions: list[InputCondition]
    context: int
    min_position: int
    neurons: list[int] = field(default_factory=list)
    moments: Moments | None = None  # every neuron's running sums (asked for by the contrast)
    extra: dict = field(default_factory=dict)

    @property
    def early(self) -> Bool[Tensor, " N"]:
        return self.local_position < self.min_position

    @property
    def in_scope(self) -> bool:
        return all(c.ok for c in self.conditions)

    def column(self, neuron: int) -> int:
        try:
            return self.neurons.index(neuron)
        except ValueError:
            raise AttnscopeError(f"neuron {neuron} was not analysed; pass it to Analyser.analyse") from None

    def window_note(self) -> str | None:
        if len(self.windows) == 1:
            return None
        return (f"The text has {len(self.tokens.strings)} tokens, more than the context of {self.context}: it was "
                f"analysed in {len(self.windows)} windows of up to {self.context} tokens overlapping by "
                f"{self.min_position}; each token is reported from the window that gives it the most context.")

    def neuron_json(self, neuron: int) -> dict:
        """What the page shows for one neuron (numbers rounded to 1e-5, far below the plot's resolution)."""
        r = lambda t: [round(float(v), 5) for v in t]  # noqa: E731
        j = self.column(neuron)
        scope = [c.to_json() for c in self.conditions]
        failing = [c.name for c in self.conditions if not c.ok]
        return {"neuron": neuron, "n_tokens": len(self.tokens.strings), "tokens": self.tokens.strings,
                "token_ids": self.tokens.ids.tolist(), "true": r(self.true[:, j]), "pred": r(self.pred[:, j]),
                "early": self.early.tolist(), "window": self.window_index().tolist(),
                "windows": [vars(w) for w in self.windows], "window_note": self.window_note(),
                "context": self.context, "min_position": self.min_position, "conditions": scope,
                "in_scope": self.in_scope, "scope_message": scope_message(self.conditions, failing),
                "fit": fit_stats(self.true[:, j], self.pred[:, j], ~self.early)}

    def window_index(self) -> Int[Tensor, " N"]:
        idx = torch.zeros(len(self.tokens.strings), dtype=torch.long)
        for j, w in enumerate(self.windows):
            idx[w.report_from : w.stop] = j
        return idx


def scope_message(conds: list[InputCondition], failing: list[str]) -> str:
    if not failing:
        return (f"All {len(conds)} conditions hold for this input: it lies inside the explanation's stated scope "
                "(early positions excepted).")
    return (f"This input lies outside the explanation's scope: {', '.join(failing)} "
            f"({len(failing)} of {len(conds)} conditions fail). The prediction is not claimed to hold here.")


def fit_stats(y: Float[Tensor, " N"], yhat: Float[Tensor, " N"], keep: Bool[Tensor, " N"]) -> dict:
    """Pearson r, FVU and mean absolute error of the prediction over the in-scope positions."""
    y, yhat = y[keep].double(), yhat[keep].double()
    if y.numel() < 2:
        return {"n": int(y.numel()), "r": None, "fvu": None, "mae": None}
    var = ((y - y.mean()) ** 2).sum()
    r = float(torch.corrcoef(torch.stack([y, yhat]))[0, 1]) if var > 0 and yhat.std() > 0 else None
    fvu = float(((y - yhat) ** 2).sum() / var) if var > 0 else None
    return {"n": int(y.numel()), "r": r, "fvu": fvu, "mae": float((y - yhat).abs().mean())}


def tokenize_text(w: ModelWeights, text: str, max_tokens: int = MAX_TOKENS) -> Tokens:
    """The text's tokens and, per token, the slice of the input it covers (decoded text as a fallback)."""
    if not isinstance(text, str) or not text.strip():
        raise EmptyTextError("the text is empty; type, paste or upload some text")
    check_text(text)  # valid Unicode, at most MAX_CHARS characters
    tok = w.tokenizer
    precheck_tokens(lambda s: len(tok(s, add_special_tokens=False, verbose=False)["input_ids"]), text, max_tokens)
    try:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError):
        enc, offsets = tok(text, add_special_tokens=False, verbose=False), None
    ids = list(enc["input_ids"])
    if not ids:
        raise EmptyTextError("the text holds no tokens; type, paste or upload some text")
    check_tokens(len(ids), limit=max_tokens)  # before any model work
    if offsets is not None:
        strings, end = [], 0
        for s, e in offsets:
            s = max(s, end)
            strings.append(text[s:e] if e > s else "")
            end = max(end, e)
        if "".join(strings).strip() == text.strip():
            return Tokens(torch.tensor(ids), strings)
    return Tokens(torch.tensor(ids), [tok.convert_tokens_to_string([t]) for t in tok.convert_ids_to_tokens(ids)])


def plan_windows(n_tokens: int, capacity: int, overlap: int) -> list[Window]:
    """Windows of ``capacity`` text tokens overlapping by ``overlap`` that report every token once."""
    if n_tokens <= capacity:
        return [Window(0, n_tokens, 0)]
    wins, start = [Window(0, capacity, 0)], capacity - overlap
    while True:
        stop = min(start + capacity, n_tokens)
        wins.append(Window(start, stop, wins[-1].stop))
        if stop == n_tokens:
            return wins
        start = stop - overlap


def window_bytes(w: ModelWeights, n: int) -> int:
    """Rough float32 bytes one window of ``n`` positions holds during :meth:`Analyser.analyse`: scores and
    patterns of every head, the MLP's pre- and post-activations and the explanation's four terms, the residual
    stream's few copies."""
    return 4 * (2 * w.n_heads * n * n + n * (6 * w.d_mlp + 8 * w.d_model))


class Analyser:
    """Holds the model, circuit and explanation once; answers texts."""

    def __init__(self, w: ModelWeights, circ: Circuit, explanation: Explanation, cal: CalibrationReference,
                 scope: ScopeSettings | None = None):
        self.w, self.circ, self.explanation, self.cal = w, circ, explanation, cal
        self.scope = scope or ScopeSettings()
        self.bos = w.bos_token_id if w.prepend_bos else None
        self.n_min = circ.settings.min_position
        self.capacity = circ.T - (1 if self.bos is not None else 0)
        self.d_mlp = w.d_mlp
        self.batch_windows = max(1, WINDOW_BATCH_BYTES // window_bytes(w, circ.T))

    def batches(self, wins: list[Window]) -> list[list[Window]]:
        """Consecutive windows of equal length, in groups whose activations fit :data:`WINDOW_BATCH_BYTES` (one
        forward pass and one prediction per group instead of per window)."""
        out: list[list[Window]] = []
        for win in wins:
            if out and len(out[-1]) < self.batch_windows and out[-1][0].stop - out[-1][0].start == win.stop - win.start:
                out[-1].append(win)
            else:
                out.append([win])
        return out

    def check_neuron(self, neuron: int) -> int:
        return check_index("neuron", neuron, self.d_mlp)

    def window_tokens(self, ids: Int[Tensor, " N"], win: Window) -> Int[Tensor, " pos"]:
        body = ids[win.start : win.stop]
        if self.bos is not None:
            body = torch.cat([torch.tensor([self.bos]), body])
        return body.to(self.w.device)

    @torch.no_grad()
    def tokens(self, text: str | Tokens) -> Tokens:
        """The text's tokens, refused (typed errors) when empty, invalid or over the limits."""
        return text if isinstance(text, Tokens) else tokenize_text(self.w, text)

    @torch.no_grad()
    def analyse(self, text: str | Tokens, neurons: Sequence[int] | None = None, moments: bool = False
                ) -> TextAnalysis:
        """True and predicted pre-activations of ``neurons`` (default: every neuron) at every token, the input's
        conditions, and with ``moments`` every neuron's running sums.  Memory: ``N x len(neurons)`` plus one
        window's activations, whatever the text's length."""
        toks = self.tokens(text)
        cols = list(range(self.d_mlp)) if neurons is None else [self.check_neuron(int(k)) for k in neurons]
        sub = None if neurons is None else torch.tensor(cols, device=self.w.device)
        N, off = len(toks.strings), 1 if self.bos is not None else 0
        wins = plan_windows(N, self.capacity, min(self.n_min, self.capacity // 2))
        true = torch.empty(N, len(cols))
        pred = torch.empty(N, len(cols))
        local = torch.empty(N, dtype=torch.long)
        mom = Moments.zeros(self.d_mlp) if moments else None
        stats: list[WindowStats] = []
        for group in self.batches(wins):
            wt = torch.stack([self.window_tokens(toks.ids, win) for win in group])  # [B, pos]
            acts = next(iter_layers(self.w, wt, stop_layer=0))
            preds = self.explanation.predict(wt, sub if mom is None else None)  # [B, pos, k or d_mlp]
            for b, win in enumerate(group):
                rep = torch.arange(win.report_from - win.start, win.stop - win.start) + off  # window positions reported
                p_b = preds[b, rep].float().cpu()
                t_all = acts.mlp_pre[b, rep]
                if mom is None:
                    p_rep, t_rep = p_b, (t_all if sub is None else t_all[:, sub]).float().cpu()
                else:
                    t_all = t_all.float().cpu()
                    mom.add(t_all, p_b, rep < self.n_min)
                    p_rep, t_rep = (p_b, t_all) if sub is None else (p_b[:, sub.cpu()], t_all[:, sub.cpu()])
                true[win.report_from : win.stop] = t_rep
                pred[win.report_from : win.stop] = p_rep
                local[win.report_from : win.stop] = rep
                judged = rep[rep >= self.n_min].to(wt.device)
                stats.append(window_stats(self.w, self.circ, wt[b], acts, judged, rep.to(wt.device), b))
            del acts, preds
        conds = evaluate_scope(self.circ, stats, self.cal, self.scope)
        return TextAnalysis(toks, wins, local, true, pred, conds, self.circ.T, self.n_min, cols, mom)

    @torch.no_grad()
    def evidence(self, text: str | Tokens, neuron: int, position: int) -> tuple[Evidence, int]:
        """Evidence for ``neuron`` at text token ``position``, and the index of the window's first text token
        (contributions are indexed from there, after the BOS when the model has one)."""
        self.check_neuron(neuron)
        toks = self.tokens(text)
        N = len(toks.strings)
        if not isinstance(position, int) or isinstance(position, bool) or not 0 <= position < N:
            raise IndexOutOfRangeError(f"token position {position!r} is outside the text: it has {N} tokens, "
                                       f"numbered 0..{N - 1}; choose one of them")
        wins = plan_windows(N, self.capacity, min(self.n_min, self.capacity // 2))
        win = next(w for w in wins if w.report_from <= position < w.stop)
        wt = self.window_tokens(toks.ids, win)
        local = position - win.start + (1 if self.bos is not None else 0)
        return self.explanation.evidence(wt, neuron, local), win.start


@dataclass
class AttentionCheck:
    """One contextual head on the user's own text: its true attention pattern beside the circuit's kernel x
    content reconstruction ``K_n(i) f(x_i) / sum_j K_n(j) f(x_j)`` and their total-variation distance per query
    (method §4-5: the decomposition, checked on this input).  First window only, at most
    :data:`~attnscope.serve.limits.MAX_ATTENTION_TOKENS` tokens."""

    head: int
    tokens: list[str]  # the window's tokens (BOS shown as "<BOS>")
    true: Float[Tensor, "n n"]
    reconstruction: Float[Tensor, "n n"]
    tv: Float[Tensor, " n"]  # 0.5 * sum_i |true - reconstruction| per query
    min_position: int
    n_text_tokens: int  # tokens in the whole text (more than the window: truncated)

    @property
    def tv_median(self) -> float:
        judged = self.tv[self.min_position :]
        return float((judged if judged.numel() else self.tv).median())

    def to_json(self) -> dict:
        """Lower triangles only (row n holds keys 0..n), rounded to 1e-4: at most 256 x 257 / 2 values each."""
        tri = lambda m: [[round(float(v), 4) for v in m[q, : q + 1]] for q in range(m.shape[0])]  # noqa: E731
        n = len(self.tokens)
        return {"head": self.head, "n": n, "tokens": self.tokens, "true": tri(self.true),
                "reconstruction": tri(self.reconstruction), "tv": [round(float(v), 4) for v in self.tv],
                "tv_median": self.tv_median, "min_position": self.min_position,
                "truncated": self.n_text_tokens > n - (1 if self.tokens and self.tokens[0] == "<BOS>" else 0),
                "n_text_tokens": self.n_text_tokens}


@torch.no_grad()
def attention_check(an: Analyser, text: str | Tokens, head: int) -> AttentionCheck:
    """The decomposition of ``head`` (a contextual head) on the first window of ``text``."""
    circ = an.circ
    if head not in circ.heads:
        raise IndexOutOfRangeError(f"head {head!r} is not a contextual head of this circuit; choose one of "
                                   f"{', '.join(map(str, circ.heads))}")
    toks = an.tokens(text)
    N = len(toks.strings)
    cap = min(an.capacity, MAX_ATTENTION_TOKENS - (1 if an.bos is not None else 0))
    wt = an.window_tokens(toks.ids, Window(0, min(N, cap), 0))
    n = wt.shape[0]
    acts = next(iter_layers(an.w, wt[None], stop_layer=0))
    assert acts.pattern is not None, "iter_layers keeps the attention patterns by default"
    A = acts.pattern[0, head].double().cpu()
    j = circ.heads.index(head)
    R = (circ.head_kernels[j, :n, :n] * circ.f[j, wt][None, :]).double().cpu().tril()
    R = R / R.sum(-1, keepdim=True).clamp_min(1e-300)
    tv = 0.5 * (A - R).abs().sum(-1)
    strings = (["<BOS>"] if an.bos is not None else []) + toks.strings[: n - (1 if an.bos is not None else 0)]
    return AttentionCheck(head, strings, A, R, tv, an.n_min, N)


def contrast(an: Analyser, text_a: str | Tokens, text_b: str | Tokens, neuron: int, top: int = 10) -> dict:
    """Two texts side by side: the neuron's mean true and predicted pre-activation on each, and the
    neurons whose true pre-activation separates them most (effect size ``d``, method §15), with the
    explanation's predicted effect beside each."""
    an.check_neuron(neuron)
    if not 1 <= top <= 100:
        raise AttnscopeError(f"top={top} is out of range; ask for 1 to 100 neurons")
    a, b = an.analyse(text_a, [neuron], moments=True), an.analyse(text_b, [neuron], moments=True)
    assert a.moments is not None and b.moments is not None, "analyse(moments=True) fills them"
    ta, va, pa, vpa, na = a.moments.stats()
    tb, vb, pb, vpb, nb = b.moments.stats()
    d_true = cohens_d(ta, va, tb, vb, min_std=1e-6)  # the pooled variance floored at 1e-12, as before
    d_pred = cohens_d(pa, vpa, pb, vpb, min_std=1e-6)
    order = d_true.abs().argsort(descending=True)[:top]
    rows = [{"neuron": int(k), "d_true": float(d_true[k]), "d_pred": float(d_pred[k]), "mean_true_a": float(ta[k]),
             "mean_true_b": float(tb[k]), "mean_pred_a": float(pa[k]), "mean_pred_b": float(pb[k])} for k in order]
    same_sign = [float(d_true[k]) * float(d_pred[k]) > 0 for k in order]
    side = lambda x, t, p, n: {"n_tokens": len(x.tokens.strings), "n_positions": n, "in_scope": x.in_scope,  # noqa: E731
                               "mean_true": float(t[neuron]), "mean_pred": float(p[neuron]),
                               "window_note": x.window_note(),
                               "failing_conditions": [c.name for c in x.conditions if not c.ok]}
    return {"neuron": neuron, "a": side(a, ta, pa, na), "b": side(b, tb, pb, nb),
            "d_true": float(d_true[neuron]), "d_pred": float(d_pred[neuron]), "top": rows,
            "top_same_sign": sum(same_sign), "n_neurons": an.d_mlp}
