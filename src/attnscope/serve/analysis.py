r"""One user text through the model and the explanation: true vs predicted pre-activation, evidence, scope.

A text longer than the circuit's context ``T`` is analysed in windows of ``T`` tokens (BOS in front of
each when the model prepends one).  Consecutive windows overlap by ``min_position`` tokens and each
token is reported once, from the window where it has the most context, so after the first window every
reported position has at least ``min_position`` tokens before it (the kernel's warm-up).  Positions
``n < min_position`` of the first window are *early*: outside the explanation's stated scope.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from attnscope.circuit.build import Circuit
from attnscope.core.errors import AttnscopeError, TextTooShortError, check_index
from attnscope.exact.forward import iter_layers
from attnscope.models import ModelWeights
from attnscope.serve.explanation import Evidence, Explanation
from attnscope.serve.scope import (
    CalibrationReference,
    InputCondition,
    ScopeSettings,
    WindowStats,
    evaluate_scope,
    window_stats,
)

MAX_CHARS = 200_000  # longer texts are refused (413): the page is for reading one text, not corpora


class EmptyTextError(TextTooShortError):
    """The user's text holds no tokens."""


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
class TextAnalysis:
    """True and predicted pre-activations of every layer-0 neuron on one text, and its scope."""

    tokens: Tokens
    windows: list[Window]
    local_position: Int[Tensor, " N"]  # each reported token's position inside its window (BOS counted)
    true: Float[Tensor, "N d_mlp"]
    pred: Float[Tensor, "N d_mlp"]
    conditions: list[InputCondition]
    context: int
    min_position: int
    extra: dict = field(default_factory=dict)

    @property
    def early(self) -> Bool[Tensor, " N"]:
        return self.local_position < self.min_position

    @property
    def in_scope(self) -> bool:
        return all(c.ok for c in self.conditions)

    def window_note(self) -> str | None:
        if len(self.windows) == 1:
            return None
        return (f"The text has {len(self.tokens.strings)} tokens, more than the context of {self.context}: it was "
                f"analysed in {len(self.windows)} windows of up to {self.context} tokens overlapping by "
                f"{self.min_position}; each token is reported from the window that gives it the most context.")

    def neuron_json(self, neuron: int) -> dict:
        """What the page shows for one neuron (numbers rounded to 1e-5, far below the plot's resolution)."""
        r = lambda t: [round(float(v), 5) for v in t]  # noqa: E731
        scope = [c.to_json() for c in self.conditions]
        failing = [c.name for c in self.conditions if not c.ok]
        return {"neuron": neuron, "n_tokens": len(self.tokens.strings), "tokens": self.tokens.strings,
                "token_ids": self.tokens.ids.tolist(), "true": r(self.true[:, neuron]), "pred": r(self.pred[:, neuron]),
                "early": self.early.tolist(), "window": self.window_index().tolist(),
                "windows": [vars(w) for w in self.windows], "window_note": self.window_note(),
                "context": self.context, "min_position": self.min_position, "conditions": scope,
                "in_scope": self.in_scope, "scope_message": scope_message(self.conditions, failing),
                "fit": fit_stats(self.true[:, neuron], self.pred[:, neuron], ~self.early)}

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


def tokenize_text(w: ModelWeights, text: str) -> Tokens:
    """The text's tokens and, per token, the slice of the input it covers (decoded text as a fallback)."""
    if not isinstance(text, str) or not text.strip():
        raise EmptyTextError("the text is empty; type, paste or upload some text")
    if len(text) > MAX_CHARS:
        raise AttnscopeError(f"the text has {len(text)} characters, more than {MAX_CHARS}; analyse a shorter excerpt")
    tok = w.tokenizer
    try:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError):
        enc, offsets = tok(text, add_special_tokens=False, verbose=False), None
    ids = list(enc["input_ids"])
    if not ids:
        raise EmptyTextError("the text holds no tokens; type, paste or upload some text")
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

    def check_neuron(self, neuron: int) -> int:
        return check_index("neuron", neuron, self.d_mlp)

    def window_tokens(self, ids: Int[Tensor, " N"], win: Window) -> Int[Tensor, " pos"]:
        body = ids[win.start : win.stop]
        if self.bos is not None:
            body = torch.cat([torch.tensor([self.bos]), body])
        return body.to(self.w.device)

    @torch.no_grad()
    def analyse(self, text: str) -> TextAnalysis:
        toks = tokenize_text(self.w, text)
        N, off = len(toks.strings), 1 if self.bos is not None else 0
        wins = plan_windows(N, self.capacity, min(self.n_min, self.capacity // 2))
        true = torch.empty(N, self.d_mlp)
        pred = torch.empty(N, self.d_mlp)
        local = torch.empty(N, dtype=torch.long)
        stats: list[WindowStats] = []
        for win in wins:
            wt = self.window_tokens(toks.ids, win)
            acts = next(iter_layers(self.w, wt[None], stop_layer=0))
            rep = torch.arange(win.report_from - win.start, win.stop - win.start) + off  # window positions reported
            true[win.report_from : win.stop] = acts.mlp_pre[0, rep].float().cpu()
            pred[win.report_from : win.stop] = self.explanation.predict(wt)[rep].float().cpu()
            local[win.report_from : win.stop] = rep
            judged = rep[rep >= self.n_min].to(wt.device)
            stats.append(window_stats(self.w, self.circ, wt, acts, judged, rep.to(wt.device)))
        conds = evaluate_scope(self.circ, stats, self.cal, self.scope)
        return TextAnalysis(toks, wins, local, true, pred, conds, self.circ.T, self.n_min)

    @torch.no_grad()
    def evidence(self, text: str, neuron: int, position: int) -> tuple[Evidence, int]:
        """Evidence for ``neuron`` at text token ``position``, and the index of the window's first text token
        (contributions are indexed from there, after the BOS when the model has one)."""
        self.check_neuron(neuron)
        toks = tokenize_text(self.w, text)
        N = len(toks.strings)
        check_index("token position", position, N)
        wins = plan_windows(N, self.capacity, min(self.n_min, self.capacity // 2))
        win = next(w for w in wins if w.report_from <= position < w.stop)
        wt = self.window_tokens(toks.ids, win)
        local = position - win.start + (1 if self.bos is not None else 0)
        return self.explanation.evidence(wt, neuron, local), win.start


def _moments(a: TextAnalysis) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """Means and variances ``[d_mlp]`` of true and predicted pre-activations over in-scope positions."""
    keep = ~a.early if (~a.early).any() else torch.ones_like(a.early)
    t, p = a.true[keep].double(), a.pred[keep].double()
    if t.shape[0] < 2:  # one position: no spread
        return t.mean(0), torch.zeros_like(t[0]), p.mean(0), torch.zeros_like(p[0]), int(keep.sum())
    return t.mean(0), t.var(0), p.mean(0), p.var(0), int(keep.sum())


def contrast(an: Analyser, text_a: str, text_b: str, neuron: int, top: int = 10) -> dict:
    """Two texts side by side: the neuron's mean true and predicted pre-activation on each, and the
    neurons whose true pre-activation separates them most (effect size ``d``, method §15), with the
    explanation's predicted effect beside each."""
    an.check_neuron(neuron)
    if not 1 <= top <= 100:
        raise AttnscopeError(f"top={top} is out of range; ask for 1 to 100 neurons")
    a, b = an.analyse(text_a), an.analyse(text_b)
    ta, va, pa, vpa, na = _moments(a)
    tb, vb, pb, vpb, nb = _moments(b)
    d_true = (ta - tb) / ((va + vb) / 2).clamp_min(1e-12).sqrt()
    d_pred = (pa - pb) / ((vpa + vpb) / 2).clamp_min(1e-12).sqrt()
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
