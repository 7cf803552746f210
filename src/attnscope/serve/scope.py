r"""Is one input inside the explanation's scope?  Each stated condition, measured on that text (method §15).

The bag explanation rests on conditions stated for the calibration text (method §6.4, §12).  For a new
input each is re-measured at the positions the explanation claims (window positions ``n >= min_position``):

* **denominators**: per contextual head, the kernel-weighted denominator ``Z_n = sum_j K_n(j) f(x_j)`` on this
  text (median over positions) divided by the calibration value the circuit reuses; the per-head scale
  error of the bag.  Holds when every ratio lies in :data:`attnscope.circuit.build.Z_RATIO_RANGE` (0.8-1.25), the
  range the report's denominator-transfer condition uses, so page and report agree on a text.
* **sink mass**: the contextual heads' true attention to the window's first position (median over positions,
  mean over heads), against the same number on the calibration text.
* **clipped content factors**: share of (head, token) pairs whose content factor ``f`` sits at the clip
  (the circuit's own "no outlier tokens" statistic), at most the circuit's threshold or twice the
  calibration text's share (the explanation was verified with that much clipping; on the demo model the
  calibration text itself exceeds the absolute threshold), and the share of glitch-like tokens the circuit masks.
* **norm scale**: CV over positions of the scale of the norm before the MLP, and its median against the
  constant the circuit uses.

Thresholds are attnscope's choices (:class:`ScopeSettings`) and the page prints them beside each value.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from attnscope.circuit.build import Z_RATIO_RANGE, Circuit, mlp_norm_scale
from attnscope.circuit.query import query_log_denominators
from attnscope.exact.forward import LayerActivations, iter_layers
from attnscope.models import ModelWeights


@dataclass
class ScopeSettings:
    denominator_ratio_range: tuple[float, float] = Z_RATIO_RANGE  # every head's Z ratio within (the report's range)
    sink_mass_delta_max: float = 0.1  # |sink mass - calibration sink mass|
    clipped_share_max: float = 0.01  # the circuit's "no outlier tokens" threshold ...
    clipped_share_cal_factor: float = 2.0  # ... or this many times the calibration text's share, if larger
    masked_share_max: float = 0.01
    norm_cv_max: float = 0.2  # the circuit's "constant MLP-norm scale" threshold
    norm_ratio_range: tuple[float, float] = (0.8, 1.25)  # median norm scale / the circuit's constant


@dataclass
class InputCondition:
    """One condition of the explanation, measured on one input."""

    name: str
    holds_when: str
    measured: float
    threshold: float
    ok: bool
    detail: str

    def to_json(self) -> dict:
        return {k: (None if isinstance(v, float) and v != v else v) for k, v in asdict(self).items()}


@dataclass
class WindowStats:
    """What the scope needs from one analysed window, at its reported positions ``n >= min_position``."""

    z_by_head: Float[Tensor, "heads n_pos"]  # kernel-weighted denominators of the chosen heads (query-conditioned:
    #                                         each query's Z / its calibrated Z, times circ.Z)
    sink: Float[Tensor, " n_pos"]  # chosen heads' mean attention to the window's first position
    norm_scale: Float[Tensor, " n_pos"]  # scale of the norm before the MLP
    f_at_tokens: Float[Tensor, "heads n_text"]  # content factors of the window's reported text tokens
    masked: Bool[Tensor, " n_text"]  # token masked by the circuit


@torch.no_grad()
def window_stats(w: ModelWeights, circ: Circuit, tokens: Int[Tensor, " pos"], acts: LayerActivations,
                 positions: Int[Tensor, " n_pos"], text_positions: Int[Tensor, " n_text"], b: int = 0) -> WindowStats:
    """``tokens [n]`` one window, whose activations are batch element ``b`` of ``acts``; ``positions``: window
    positions judged (``>= min_position``); ``text_positions``: window positions of text tokens reported from this
    window (BOS excluded)."""
    n = tokens.shape[0]
    fx = circ.f[:, tokens]  # [h, n]
    Zn = torch.einsum("hnj,hj->hn", circ.head_kernels[:, :n, :n], fx)[:, positions]
    if circ.query_conditioned:  # each query's own Z over this window against its calibrated Z, in units of circ.Z

        logZ, logZ_cal = query_log_denominators(w, circ, tokens)
        Zn = (torch.exp(logZ - logZ_cal)[:, positions] * circ.Z[:, None].double()).to(Zn.dtype)
    hs = torch.tensor(circ.heads, device=tokens.device)
    assert acts.pattern is not None, "iter_layers keeps the patterns by default"
    sink = acts.pattern[b, hs][:, positions, 0].mean(0)
    scale = mlp_norm_scale(w, acts.resid_pre[b] + acts.attn_out[b])[positions]
    return WindowStats(Zn, sink, scale, fx[:, text_positions], ~circ.token_mask[tokens[text_positions]])


@dataclass
class CalibrationReference:
    """The calibration text's values of the relative conditions."""

    sink_mass: float  # contextual heads' median attention to position 0 (positions >= min_position)
    clipped_share: float  # share of (head, token) content factors at the clip


@torch.no_grad()
def calibration_reference(w: ModelWeights, circ: Circuit) -> CalibrationReference:
    cal = circ.calibration_tokens.to(w.device)
    acts = next(iter_layers(w, cal[None], stop_layer=0))
    n_min = circ.settings.min_position
    hs = torch.tensor(circ.heads, device=cal.device)
    assert acts.pattern is not None, "iter_layers keeps the patterns by default"
    body = cal[1:] if w.prepend_bos else cal
    clip = circ.settings.f_clip
    return CalibrationReference(float(acts.pattern[0, hs, n_min:, 0].mean(0).median()),
                                float((circ.f[:, body] >= clip * (1 - 1e-6)).float().mean()))


def _ratio_cond(name: str, holds: str, ratios: list[float], lo_hi: tuple[float, float], detail: str) -> InputCondition:
    """Holds when every ratio lies in ``lo_hi``; measured: the ratio farthest from 1 on a log scale, against
    the bound on its side (as :func:`attnscope.circuit.build.denominator_transfer_condition` reports it)."""
    lo, hi = lo_hi
    worst = max(ratios, key=lambda r: abs(math.log(max(r, 1e-12))))
    return InputCondition(name, f"{holds} ({lo:g}-{hi:g})", worst, hi if worst >= 1 else lo,
                          all(lo <= r <= hi for r in ratios), detail)


def evaluate_scope(circ: Circuit, stats: list[WindowStats], cal: CalibrationReference,
                   s: ScopeSettings | None = None) -> list[InputCondition]:
    """The conditions of the bag explanation on one input (all its windows together)."""
    s = s or ScopeSettings()
    n_min = circ.settings.min_position
    Z = torch.cat([st.z_by_head for st in stats], 1)
    n_pos = Z.shape[1]
    if n_pos == 0:
        return [InputCondition("long enough", f"at least one position n >= min_position = {n_min} (the kernel's "
                               "warm-up; earlier positions are outside every condition)", 0.0, 1.0, False,
                               f"the text is shorter than {n_min + 1} tokens: every position is early")]
    ratios = (Z.median(1).values / circ.Z).tolist()
    per_head = ", ".join(f"H{h}: {r:.2f}" for h, r in zip(circ.heads, ratios))
    sink = float(torch.cat([st.sink for st in stats]).median())
    f = torch.cat([st.f_at_tokens for st in stats], 1)
    clip = circ.settings.f_clip
    clipped = float((f >= clip * (1 - 1e-6)).float().mean()) if f.numel() else 0.0
    masked = float(torch.cat([st.masked for st in stats]).float().mean()) if f.numel() else 0.0
    clip_max = max(s.clipped_share_max, s.clipped_share_cal_factor * cal.clipped_share)
    cal_sink = cal.sink_mass
    scale = torch.cat([st.norm_scale for st in stats])
    cv = float(scale.std() / scale.mean()) if scale.numel() > 1 else 0.0
    return [
        _ratio_cond("denominators as on calibration", "each contextual head's denominator Z on this text (median over "
                    "positions) over the calibration value the bag reuses, within", ratios,
                    s.denominator_ratio_range, f"ratio to calibration per head: {per_head}"),
        InputCondition("sink mass as on calibration", "contextual heads' attention to the first position close to "
                       "its calibration value (absolute difference)", abs(sink - cal_sink), s.sink_mass_delta_max,
                       abs(sink - cal_sink) <= s.sink_mass_delta_max,
                       f"sink mass {sink:.3f} on this text, {cal_sink:.3f} on calibration"),
        InputCondition("few clipped content factors", f"share of (head, token) content factors clipped at {clip:g} x "
                       f"median at most {s.clipped_share_max:.0%} or {s.clipped_share_cal_factor:g} x the calibration "
                       "text's share, whichever is larger", clipped, clip_max, clipped <= clip_max,
                       f"{clipped:.1%} of factors clipped; {cal.clipped_share:.1%} on calibration"),
        InputCondition("few glitch-like tokens", "share of tokens the circuit masks (outlier embedding norm)",
                       masked, s.masked_share_max, masked <= s.masked_share_max, f"{masked:.1%} of tokens masked"),
        InputCondition("constant MLP-norm scale", "CV over positions of the scale of the norm before the MLP", cv,
                       s.norm_cv_max, cv <= s.norm_cv_max, f"over {n_pos} positions"),
        _ratio_cond("norm scale as on calibration", "median scale of the norm before the MLP over the circuit's "
                    "constant, within", [float(scale.median()) / circ.mlp_scale], s.norm_ratio_range,
                    f"median {float(scale.median()):.3f} on this text, constant {circ.mlp_scale:.3f}"),
    ]
