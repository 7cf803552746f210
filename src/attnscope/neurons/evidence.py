r"""The evidence a neuron card shows beside the method's numbers (issue 21, item 3).

* :func:`activation_examples`: each reported neuron's top activating windows on the *reporting half* of the
  held-out texts (the bundled excerpts, which the demo model was never trained on, or the user's ``--eval``
  texts; none of them tuned the threshold), token by token, with the TRUE pre-activation and the method's
  per-position PREDICTION beside it (the full layer-0 explanation, the same one the cards' traces draw); and a
  histogram of its true pre-activation on each held-out text.
* :func:`direct_logits`: the direct effect of each neuron's output weight on the output logits,
  ``W_out[n] @ W_U`` through the final norm frozen at a typical scale (:mod:`attnscope.models.unembed`).
  What the later layers do with that direction is left out.
* :func:`precision_curve`: precision of the ranking's prefixes against the threshold, on both halves, with the
  base rate (what random neurons score).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from attnscope.circuit.result import Circuit
from attnscope.core.stats import median, tensor_sum
from attnscope.core.texts import decode_tokens
from attnscope.exact.forward import iter_layers
from attnscope.models import ModelWeights
from attnscope.models.unembed import NO_OUTPUT_HEAD, direct_logit_effect, final_norm_scale
from attnscope.neurons.contrast import SourceWindows
from attnscope.neurons.explain import Explainer, explain_terms, true_pre

N_EXAMPLES = 3  # top windows per neuron
BEFORE, AFTER = 11, 4  # tokens shown before and after the peak
N_BINS = 20  # histogram bins (shared by the neuron's texts)
N_LOGITS = 10  # top and bottom output tokens
EXAMPLES_FROM = ("the reporting half of the held-out texts (not used to calibrate the circuit or tune the "
                 "threshold; the bundled excerpts were never used to train the demo model)")
LOGIT_NOTE = ("direct effect only: the neuron's output weight W_out[n] through the final norm (its gain applied, "
              "its scale frozen at the median over {where}, s = {s}) and the unembedding W_U, in "
              "logits per unit of the neuron's activation; what the later layers do with this direction is left "
              "out")


@dataclass
class ActivationExample:
    """One window around a neuron's peak: the tokens, with the true and the predicted pre-activation."""

    text: str  # the held-out text's name
    window: int  # index of the window in that text's reporting half
    start: int  # position (in the window) of the first token shown
    tokens: list[str]
    true: list[float]  # the model's own pre-activation
    predicted: list[float]  # the full layer-0 explanation (per position, from the weights)
    peak: int  # index in ``tokens`` of the largest true pre-activation

    @property
    def max_true(self) -> float:
        return self.true[self.peak]


@dataclass
class ActivationHistogram:
    text: str
    counts: list[int]  # positions per bin (bins: the neuron's ``edges``)
    n: int
    mean: float


@dataclass
class NeuronExamples:
    neuron: int
    examples: list[ActivationExample]  # by max true pre-activation, one per window
    edges: list[float]  # N_BINS + 1 bin edges, shared by the histograms
    histograms: list[ActivationHistogram]  # one per held-out text


@dataclass
class LogitEffect:
    neuron: int
    top: list[tuple[str, float]]  # output tokens it raises most (logits per unit activation)
    bottom: list[tuple[str, float]]  # ... and lowers most


@dataclass
class DirectLogits:
    available: bool  # False: the model has no output head
    note: str  # what the numbers are, or why there are none
    scale: float | None  # the frozen final-norm scale s
    effects: list[LogitEffect] = field(default_factory=list)


@dataclass
class PrecisionCurve:
    """Precision of the ranking's prefixes ``{sensitivity >= T}`` against the threshold ``T``."""

    thresholds: list[float]  # T, descending
    n_passed: list[int]
    precision_reporting: list[float]
    precision_tuning: list[float]
    base_rate_reporting: float  # precision of all neurons (= the expected precision of random neurons)
    base_rate_tuning: float
    threshold: float  # the tuned threshold (inf: none passed)
    precision_target: float


@dataclass
class NeuronEvidence:
    texts: list[str]  # the held-out sources the examples and histograms come from
    half: str  # which windows: EXAMPLES_FROM
    examples: list[NeuronExamples]  # one per card, in card order
    logits: DirectLogits
    curve: PrecisionCurve | None

    def for_neuron(self, k: int) -> tuple[NeuronExamples | None, LogitEffect | None]:
        ex = next((e for e in self.examples if e.neuron == k), None)
        return ex, next((e for e in self.logits.effects if e.neuron == k), None)


@dataclass
class WindowRun:
    """One held-out window with the true and the predicted pre-activation of the card neurons."""

    text: str
    window: int  # index in the text's reporting half
    tokens: Tensor  # [T]
    true: Tensor  # [T, k]
    predicted: Tensor  # [T, k]


@torch.no_grad()
def activation_examples(w: ModelWeights, circ: Circuit, ex: Explainer, neurons: list[int],
                        windows: list[SourceWindows], n_examples: int = N_EXAMPLES) -> list[NeuronExamples]:
    """Top windows and per-text histograms of the layer-0 ``neurons`` on the reporting windows (positions
    ``>= n_min``), the prediction being the full layer-0 explanation."""
    if not neurons:
        return []
    idx = torch.tensor(neurons, device=w.device)
    runs = [WindowRun(s.name, j, win, true_pre(w, win)[:, idx].double().cpu(),
                      tensor_sum(explain_terms(w, circ, ex, win, idx).values()).double().cpu())
            for s in windows for j, win in enumerate(s.report)]
    return examples_from_runs(w, neurons, runs, circ.settings.min_position, n_examples)


def examples_from_runs(w: ModelWeights, neurons: list[int], runs: list[WindowRun], n_min: int,
                       n_examples: int = N_EXAMPLES) -> list[NeuronExamples]:
    """For each of ``neurons`` (column ``c`` of every run): the ``n_examples`` windows with the largest true
    pre-activation at positions ``>= n_min`` (one example per window, the peak with up to ``BEFORE`` tokens before
    it and ``AFTER`` after), and a histogram per text over those positions (bins shared by the neuron's texts)."""
    out = []
    for c, k in enumerate(neurons):
        peaks = sorted(((float(r.true[n_min:, c].max()), i) for i, r in enumerate(runs)), reverse=True)[:n_examples]
        exs = []
        for _, i in peaks:
            r = runs[i]
            p = n_min + int(r.true[n_min:, c].argmax())
            a, b = max(n_min, p - BEFORE), min(len(r.tokens), p + AFTER + 1)
            exs.append(ActivationExample(r.text, r.window, a, decode_tokens(w.tokenizer, r.tokens[a:b].tolist()),
                                         [round(float(v), 4) for v in r.true[a:b, c]],
                                         [round(float(v), 4) for v in r.predicted[a:b, c]], p - a))
        by_text: dict[str, list[Tensor]] = {}
        for r in runs:
            by_text.setdefault(r.text, []).append(r.true[n_min:, c])
        allv = torch.cat([v for vs in by_text.values() for v in vs])
        lo, hi = float(allv.min()), float(allv.max())
        hi = hi if hi > lo else lo + 1.0
        edges = torch.linspace(lo, hi, N_BINS + 1, dtype=torch.float64)
        hists = []
        for name, vs in by_text.items():
            v = torch.cat(vs)
            counts = torch.histc(v, bins=N_BINS, min=lo, max=hi)
            hists.append(ActivationHistogram(name, [int(x) for x in counts], len(v), round(float(v.mean()), 4)))
        out.append(NeuronExamples(k, exs, [round(float(e), 4) for e in edges], hists))
    return out


@torch.no_grad()
def direct_logits(w: ModelWeights, neurons: list[int], texts: list[Tensor], n_min: int, where: str, layer: int = 0,
                  n: int = N_LOGITS) -> DirectLogits:
    """Top and bottom output tokens of each neuron's output weight ``W_out[layer][k]``
    (:mod:`attnscope.models.unembed`), the final norm frozen at its median scale over positions ``>= n_min`` of
    ``texts`` (token windows; ``where`` names them in the note)."""
    if w.W_U is None:
        return DirectLogits(False, NO_OUTPUT_HEAD + " (an encoder read without a language-model head, as the MiniLM "
                            "package ships it), so no direct effect on output tokens", None)
    if not neurons:
        return DirectLogits(True, LOGIT_NOTE.format(where=where, s="—"), None)
    scales = []
    for toks in texts:
        resid = None
        for act in iter_layers(w, toks.to(w.device)[None], patterns=False):
            resid = act.resid_post[0]
        assert resid is not None
        scales += final_norm_scale(w, resid[n_min:]).double().cpu().tolist()
    m = median(scales)
    s = 1.0 if m is None else float(m)
    eff = direct_logit_effect(w, w.W_out[layer][torch.tensor(neurons, device=w.device)], s).double().cpu()
    out = []
    for c, k in enumerate(neurons):
        top, bot = eff[c].topk(n), (-eff[c]).topk(n)
        out.append(LogitEffect(k, [(t, round(float(v), 4)) for t, v in
                                   zip(decode_tokens(w.tokenizer, top.indices.tolist()), top.values)],
                               [(t, round(-float(v), 4)) for t, v in
                                zip(decode_tokens(w.tokenizer, bot.indices.tolist()), bot.values)]))
    return DirectLogits(True, LOGIT_NOTE.format(where=where, s=f"{s:.3g}"), s, out)


def precision_curve(sensitivity: Tensor, ok_tune: Tensor, ok_report: Tensor, threshold: float,
                    precision_target: float, n_points: int = 160) -> PrecisionCurve:
    """Precision of every prefix of the ranking by ``sensitivity`` on each half (``ok_*``: the neuron is validated
    on that half), sampled at ``n_points`` prefix sizes spread on a log scale (every size up to 20)."""
    order = sensitivity.argsort(descending=True)
    N = len(order)
    ranks = torch.arange(1, N + 1, dtype=torch.float64)
    pt = ok_tune[order].double().cumsum(0) / ranks
    pr = ok_report[order].double().cumsum(0) / ranks
    ks = sorted({int(round(float(x))) for x in torch.logspace(0, torch.log10(torch.tensor(float(N))), n_points)}
                | set(range(1, min(N, 20) + 1)) | {N} | ({int((sensitivity >= threshold).sum())} - {0}))
    return PrecisionCurve([round(float(sensitivity[order[k - 1]]), 4) for k in ks], ks,
                          [round(float(pr[k - 1]), 4) for k in ks], [round(float(pt[k - 1]), 4) for k in ks],
                          float(ok_report.double().mean()), float(ok_tune.double().mean()), threshold,
                          precision_target)
