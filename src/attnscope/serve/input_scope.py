r"""What one text input, and one contrast of two inputs, measure against the explanation's scope (issue 19).

:func:`measure_text` runs the layer-0 pass once per window of a text and keeps what every later step needs:

* the true MLP-0 pre-activation sums per window (:class:`attnscope.neurons.verification.PreStats`, for the effect sizes,
  the noise ceiling and the token-mean baseline);
* the served page's input conditions (:func:`attnscope.serve.scope.evaluate_scope`: denominators, sink mass,
  clipped content factors, glitch-like tokens, norm scale), each with its measured value and threshold;
* token statistics of the judged positions (``n >= min_position``): the share of distinct tokens, of the most
  frequent token, and of tokens the calibration text never holds;
* the full explanation's within-text FVU (median over neurons of the median over windows), the error the
  scope conditions are meant to predict.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from jaxtyping import Int
from torch import Tensor

from attnscope.circuit.build import Circuit
from attnscope.exact.forward import iter_layers
from attnscope.models import ModelWeights
from attnscope.neurons.explain import Explainer, explain_terms, fit_scores
from attnscope.neurons.verification import PreStats
from attnscope.serve.scope import CalibrationReference, InputCondition, evaluate_scope, window_stats


@dataclass
class TextMeasure:
    """One text's windows measured once (see the module docstring)."""

    n_tokens: int
    n_windows: int
    n_positions: int  # judged positions n >= min_position over all windows
    conditions: list[InputCondition]  # the served page's input conditions
    distinct_share: float  # distinct tokens / judged positions
    top_token_share: float  # share of judged positions holding the most frequent token
    unseen_share: float  # share of judged positions whose token the calibration text never holds
    fvu_within: float | None  # the full explanation's within-text FVU: median over neurons of the median over windows
    stats: list[PreStats] = field(repr=False, default_factory=list)  # per window, for the effect sizes

    def condition(self, name: str) -> InputCondition | None:
        return next((c for c in self.conditions if c.name == name), None)


@torch.no_grad()
def measure_text(w: ModelWeights, circ: Circuit, ex: Explainer, cal: CalibrationReference,
                 windows: list[Int[Tensor, " T"]], n_tokens: int, fvu_windows: int = 4) -> TextMeasure:
    n_min = circ.settings.min_position
    bos = 1 if w.prepend_bos else 0
    stats, scope, fvus, judged = [], [], [], []
    for i, win in enumerate(windows):
        win = win.to(w.device)
        acts = next(iter_layers(w, win[None], stop_layer=0))
        y = acts.mlp_pre[0, n_min:].double().cpu()
        stats.append(PreStats(y.shape[0], y.sum(0), (y**2).sum(0)))
        pos = torch.arange(n_min, len(win), device=win.device)
        scope.append(window_stats(w, circ, win, acts, pos, torch.arange(bos, len(win), device=win.device)))
        judged.append(win[n_min:].cpu())
        if i < fvu_windows and y.shape[0] >= 2:
            yhat = functools.reduce(torch.add, explain_terms(w, circ, ex, win).values())[n_min:].double().cpu()
            fvus.append(fit_scores(y, yhat)[1])
    t = torch.cat(judged) if judged else torch.zeros(0, dtype=torch.long)
    n = max(len(t), 1)
    counts = torch.bincount(t) if len(t) else torch.zeros(1)
    cal_ids = set(circ.calibration_tokens.tolist())
    unseen = sum(1 for x in t.tolist() if x not in cal_ids)
    fvu = float(torch.stack(fvus).median(0).values.median()) if fvus else None
    return TextMeasure(n_tokens, len(windows), int(len(t)), evaluate_scope(circ, scope, cal),
                       float((counts > 0).sum()) / n, float(counts.max()) / n, unseen / n, fvu, stats)
