r"""Contextual circuits that feed the MLP of a later layer ``L`` (issue 11).

For each layer ``l <= L`` the residual entering it is approximated by token + position
(:mod:`attnscope.later.effective`), and the layer-0 method is applied unchanged to a *view* of the model whose
layer 0 is layer ``l`` and whose embeddings are the effective ones (:func:`attnscope.later.effective.layer_view`):
key split, kernels, contextual heads, calibrated denominators, extended embeddings ``Ext_l``.  The heads of
layer ``l < L`` write into the residual after that layer's attention; their (bag-shaped, slowly varying)
output reaches the MLP of ``L`` through a linear map

    G_l = (I + J_l) prod_{l < m < L} (I + A_m)(I + J_m) (I + A_L)
    A_m = C diag(gamma1_m) sum_h keep_h W_V^h W_O^h / s1_m       (every head passes a broad deviation on)
    J_m = C diag(gamma2_m) W_in diag(E act') W_out / s2_m        (each MLP linearised around the sample)

(``C`` centres for LayerNorm; ``keep_h`` is the mean attention not on BOS; scales and slopes are sample
means).  This is how far the earlier layers' context neurons are linear in the bag.

**Each term once.**  The MLP of ``L`` reads ``r_L(n) + attn_L(n)``, written as

    r_L(n) ~ E'_L[x_n] + pi'_L(n) + c_L(n),   c_L(n) = sum_{l<L} [bag_l(n) + other_l(n)] G_l
    attn_L(n) ~ bag_L(n) + other_L(n) + biases

where ``bag_l`` is layer ``l``'s contextual circuit and ``other_l`` its other heads through their kernels
and content factors (:mod:`attnscope.neurons.explain`), both on effective inputs.  ``E'_L, pi'_L`` are fitted to
``r_L - c_L`` on the sample, so what the earlier heads explain is not also in the effective embedding.
Under i.i.d. tokens with frequencies ``p`` the expected pre-activation is ``p^T U W_in' / s`` with
``U = E'_L + sum_{l<L} (Ext_l + Oth_l) G_l + Ext_L + Oth_L`` (centred): the token model that ranks neurons.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from attnscope.circuit.build import Circuit, CircuitSettings, build_circuit, circuit_fidelity, mlp_input_weights
from attnscope.circuit.query import circuit_output
from attnscope.core.errors import AttnscopeError, ConditionFailedError, NoContextualHeadsError, check_index
from attnscope.core.stats import tensor_sum
from attnscope.core.texts import bundled_texts, require_diverse
from attnscope.exact.decomposition import centre
from attnscope.exact.forward import iter_layers
from attnscope.later.effective import (
    EffectiveEmbedding,
    SampleActivations,
    approximation_error,
    estimate,
    layer_view,
    sample_activations,
)
from attnscope.later.result import Approximation, EffectiveSummary, LaterCircuitRecord, LayerPiece
from attnscope.models import ModelWeights
from attnscope.neurons.contrast import SourceWindows, TokenModel, build_token_model, source_windows
from attnscope.neurons.explain import Explainer, build_explainer, other_heads_output


@dataclass
class LaterSettings:
    eval: list[str] | None = None  # labelled sources (default: the bundled texts); tuning halves = the sample
    max_windows: int = 8  # windows per source; the first half is the sample, the second half reports
    prior_count: float | None = None  # weight of the direct-path prior per token (None: empirical Bayes)
    precision_target: float = 0.9
    n_cards: int = 16
    n_random: int = 64
    top_m: int = 100
    seed: int = 0
    rank_by: str = "hybrid"  # predictor that ranks and selects the neurons ("full": weights-only composition)


@dataclass
class LaterCircuit:
    """Everything the layer-``L`` analysis composes (tensors kept out of the JSON)."""

    layer: int
    pieces: list[LayerPiece]
    windows: list[SourceWindows] = field(repr=False)
    circuits: dict[int, Circuit] = field(repr=False)
    views: dict[int, ModelWeights] = field(repr=False)
    explainers: dict[int, Explainer] = field(repr=False)
    G: dict[int, Tensor] = field(repr=False)  # l < L -> [d_model, d_model], to the MLP input of L
    R: dict[int, Tensor] = field(repr=False)  # l < L -> [d_model, d_model], to the residual entering L
    # set by build_later once the earlier layers' terms are known (both are computed from this object)
    direct: EffectiveEmbedding = field(init=False, repr=False)  # E'_L, pi'_L (earlier terms removed)
    token_model: TokenModel = field(init=False, repr=False)
    scale: float = 1.0  # median scale of the norm in front of the MLP of L (true model, sample)
    n_min: int = 25
    approximation_direct: Approximation | None = None  # held-out error of E'_L + pi'_L + c_L
    scale_dim: int = 0  # d_model
    gain: dict[int, float] = field(default_factory=dict)  # l < L -> fitted gain of the propagated term

    def record(self) -> LaterCircuitRecord:
        """The measured numbers of the composition (the typed, saved part; tensors stay here)."""
        assert self.approximation_direct is not None
        return LaterCircuitRecord(self.layer, self.scale, self.n_min, self.pieces,
                                  EffectiveSummary(**self.direct.to_json()), self.approximation_direct)


# --------------------------------------------------------------------------------------------------
# Linear propagation of a broad residual deviation to the MLP of L
# --------------------------------------------------------------------------------------------------


def _centring(w: ModelWeights) -> Tensor:
    d = w.d_model
    I = torch.eye(d, dtype=torch.float64)
    return I - 1.0 / d if w.norm == "layernorm" else I


def attention_map(w: ModelWeights, sa: SampleActivations, m: int) -> Tensor:
    """``A_m [d, d]``: what all heads of layer ``m`` add for a deviation shared by every non-BOS position."""
    WOV = torch.einsum("hde,hef->hdf", w.W_V[m].double(), w.W_O[m].double()).cpu()
    A = (sa.keep[m].double()[:, None, None] * WOV).sum(0)
    return _centring(w) @ (w.ln1_w[m].double().cpu()[:, None] * A) / sa.attn_scale[m]


def mlp_map(w: ModelWeights, sa: SampleActivations, m: int) -> Tensor:
    """``J_m [d, d]``: the MLP of layer ``m`` linearised around the sample (mean derivative per neuron)."""
    W_in, W_out = w.W_in[m].double().cpu(), w.W_out[m].double().cpu()
    if w.W_gate is None:
        D = W_in * sa.slope[m].double()[None]
    else:
        gate_mean = sa.gate_mean[m]
        assert gate_mean is not None, "sample_activations records the gate mean of gated MLPs"
        D = w.W_gate[m].double().cpu() * sa.slope[m].double()[None] + W_in * gate_mean.double()[None]
    return _centring(w) @ (w.ln2_w[m].double().cpu()[:, None] * D) @ W_out / sa.mlp_scale[m]


def propagation(w: ModelWeights, sa: SampleActivations, l: int, L: int) -> tuple[Tensor, Tensor]:
    """``(G_l, R_l)`` ``[d, d]``: from the residual after layer ``l``'s attention to the input of the MLP of
    ``L`` (``G_l``) and to the residual entering layer ``L`` (``R_l``, without layer ``L``'s heads).

    Parallel attention + MLP (GPT-NeoX): every block adds ``attn(ln1(r)) + mlp(ln2(r))`` of the same input,
    so layer ``l``'s heads reach neither the MLP of ``l`` nor, at ``L``, does the MLP read layer ``L``'s heads:
    ``R_l = prod_{l<m<L} (I + A_m + J_m)`` and ``G_l = R_l``."""
    I = torch.eye(w.d_model, dtype=torch.float64)
    if w.parallel_attn_mlp:
        R = I.clone()
        for m in range(l + 1, L):
            R = R @ (I + attention_map(w, sa, m) + mlp_map(w, sa, m))
        return R.float(), R.float()
    R = I + mlp_map(w, sa, l)
    for m in range(l + 1, L):
        R = R @ (I + attention_map(w, sa, m)) @ (I + mlp_map(w, sa, m))
    return (R @ (I + attention_map(w, sa, L))).float(), R.float()


# --------------------------------------------------------------------------------------------------
# Building the composition
# --------------------------------------------------------------------------------------------------


def sources(w: ModelWeights, cs: CircuitSettings, s: LaterSettings, T: int) -> list[SourceWindows]:
    """Windows of each labelled source; the calibration source starts after the calibration window."""
    specs = list(dict.fromkeys(s.eval or [f"bundled:{n}" for n in bundled_texts()]))
    if len(specs) < 2:
        raise AttnscopeError("later-layer neurons need at least two sources for one-vs-rest contrasts; "
                             "pass --eval twice or more")
    skip = T - (1 if w.prepend_bos else 0)
    out = [source_windows(w, x, T, max_windows=s.max_windows, skip_tokens=skip if x == cs.calibration else 0)
           for x in specs]
    for sw in out:  # a degenerate held-out text would make every neuron "pass"
        require_diverse(torch.cat([sw.tune, sw.report])[:, 1 if w.prepend_bos else 0:], sw.spec, "evaluation")
    return out


def _layer_circuit(view: ModelWeights, cs: CircuitSettings) -> tuple[Circuit, str | None, str | None]:
    """The layer's contextual circuit; when no head qualifies, an empty one (no bag: every head is then an
    *other* head of the explanation), the failed condition and its limiting measurement."""
    try:
        return build_circuit(view, cs), None, None
    except ConditionFailedError as e:
        limiting = e.limiting if isinstance(e, NoContextualHeadsError) else str(e)
        c = build_circuit(view, replace(cs, heads=[0]))
        return replace(c, heads=[], ext=torch.zeros_like(c.ext), positional=torch.zeros_like(c.positional),
                       head_kernels=c.head_kernels[:0], f=c.f[:0], Z=c.Z[:0], conditions=[]), str(e), limiting


@torch.no_grad()
def earlier_terms(lc: LaterCircuit, tokens: Tensor, *, to_residual: bool = False) -> Tensor:
    """``c_L(n) [pos, d_model]``: the earlier layers' heads on ``tokens [pos]``, propagated by ``G_l`` to the
    input of the MLP of L (or by ``R_l`` to the residual entering L, ``to_residual``)."""
    out = torch.zeros(tokens.shape[-1], lc.scale_dim)
    for l, y in layer_terms(lc, tokens, to_residual=to_residual).items():
        out += lc.gain.get(l, 1.0) * y
    return out


@torch.no_grad()
def layer_terms(lc: LaterCircuit, tokens: Tensor, *, to_residual: bool = False) -> dict[int, Tensor]:
    """Each earlier layer's heads on ``tokens [pos]`` through ``G_l`` (or ``R_l``), before the gain."""
    out = {}
    for l, circ in lc.circuits.items():
        if l >= lc.layer:
            continue
        dev = circ.kernel.device
        y = circ.summary(tokens.to(dev)) + other_heads_output(lc.explainers[l], tokens.to(dev))
        out[l] = y.float().cpu() @ (lc.R[l] if to_residual else lc.G[l])
    return out


def fit_gains(w: ModelWeights, sa: SampleActivations, layer: int, terms: dict[int, Tensor], prior_count,
              rounds: int = 3) -> tuple[EffectiveEmbedding, dict[int, float]]:
    """Fit ``E'_L, pi'_L`` and one gain per earlier layer's propagated term by alternating least squares on
    the sample: ``r_L ~ E'[x] + pi'(n) + sum_l gain_l c_l(n)`` (gain 1: the linearisation is calibrated)."""
    ls = sorted(terms)
    gain = {l: 1.0 for l in ls}
    R = sa.resid[layer][:, 1:].reshape(-1, w.d_model).double()
    X = torch.stack([terms[l][:, 1:].reshape(-1, w.d_model).double() for l in ls], -1)  # [N, d, n_l]

    for _ in range(rounds):
        eff = estimate(w, layer, sa, offset=tensor_sum(gain[l] * terms[l] for l in ls), prior_count=prior_count)
        y = R - (eff.E[sa.tokens] + eff.pi)[:, 1:].reshape(-1, w.d_model).double()
        A = torch.einsum("ndi,ndj->ij", X, X)
        b = torch.einsum("ndi,nd->i", X, y)
        g = torch.linalg.lstsq(A, b[:, None]).solution[:, 0]
        gain = {l: float(g[j]) for j, l in enumerate(ls)}
    eff = estimate(w, layer, sa, offset=tensor_sum(gain[l] * terms[l] for l in ls), prior_count=prior_count)
    return eff, gain


def _true_heads(w: ModelWeights, l: int, heads: list[int], toks: Tensor) -> Tensor:
    for a in iter_layers(w, toks.to(w.device)[None], stop_layer=l):
        if a.layer == l:
            hs = torch.tensor(heads, device=w.device)
            return torch.einsum("hpe,hed->pd", a.z[0, hs], w.W_O[l][hs])
    raise AssertionError


def _circuit_fvus(w: ModelWeights, l: int, view: ModelWeights, circ: Circuit, texts: dict[str, Tensor]):
    """The circuit's FVU against the heads on effective inputs and against the model's true heads."""
    eff_fvu = circuit_fidelity(view, circ, texts)["fvu"]
    n_min = circ.settings.min_position
    ys, yh = [], []
    for t in texts.values():
        t = t[: circ.T]
        ys.append(centre(_true_heads(w, l, circ.heads, t), w)[n_min:].double().cpu())
        # the form circuit_fidelity scores
        yh.append(centre(circuit_output(view, circ, t.to(view.device)), w)[n_min:].double().cpu())
    y, yhat = torch.cat(ys), torch.cat(yh)
    return eff_fvu, float(((y - yhat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())


def _token_parts(w: ModelWeights, lc: LaterCircuit) -> dict[str, Tensor]:
    """Each term's token vectors ``[d_vocab, d_model]`` (centred) for the MLP of L."""
    d = w.d_model
    earlier = torch.zeros(w.d_vocab, d)
    own = {"contextual bag": torch.zeros(w.d_vocab, d), "other heads": torch.zeros(w.d_vocab, d)}
    for l, circ in lc.circuits.items():
        tm = build_token_model(lc.views[l], circ, lc.explainers[l], per_token_scale=False)
        bag, oth = tm.parts["contextual bag"].float().cpu(), tm.parts["other heads"].float().cpu()
        if l < lc.layer:
            earlier += lc.gain.get(l, 1.0) * (bag + oth) @ lc.G[l]
        elif not w.parallel_attn_mlp:  # with parallel attention the MLP of L does not read layer L's heads
            own = {"contextual bag": bag, "other heads": oth}
    parts = {"direct": lc.direct.E, "earlier layers": earlier, **own}
    return {k: centre(v, w).to(w.dtype).to(w.device) for k, v in parts.items()}


@dataclass
class Shared:
    """What every ``L`` of one model shares: the windows, the sample runs, each layer's circuit."""

    cs: CircuitSettings
    windows: list[SourceWindows]
    sa: SampleActivations
    held: dict[int, Tensor]  # layer -> [N, T, d] true residual on the reporting windows
    n_min: int
    layers: dict[int, tuple] = field(default_factory=dict)  # l -> (view, circuit, explainer, piece)


@torch.no_grad()
def prepare(w: ModelWeights, top: int, cs: CircuitSettings | None = None, s: LaterSettings | None = None) -> Shared:
    """Windows and sample runs for every layer ``<= top`` (the sample: the tuning halves of the sources)."""
    check_index("layer", top, w.n_layers)
    s = s or LaterSettings()
    T = min(w.n_ctx, 256) if (cs is None or cs.n_ctx is None) else cs.n_ctx
    cs = replace(cs or CircuitSettings(), n_ctx=T)
    wins = sources(w, cs, s, T)
    sample = torch.cat([x.tune for x in wins])
    report = torch.cat([x.report for x in wins])
    sa = sample_activations(w, sample, list(range(top + 1)))
    held = sample_activations(w, report, list(range(top + 1))).resid
    n_min = cs.min_position if cs.min_position is not None else cs.window // 4
    return Shared(cs, wins, sa, held, n_min)


def _layer(w: ModelWeights, l: int, sh: Shared, s: LaterSettings) -> tuple:
    """Layer ``l``'s effective embedding, view, circuit (empty if none qualifies), explainer and record."""
    if l not in sh.layers:
        eff = estimate(w, l, sh.sa, prior_count=s.prior_count)
        view = layer_view(w, eff)
        circ, err, limiting = _layer_circuit(view, sh.cs)
        report = torch.cat([x.report for x in sh.windows])
        err_l = approximation_error(w, eff, report, n_min=sh.n_min, resid=sh.held[l])
        piece = LayerPiece(l, EffectiveSummary(**eff.to_json()), Approximation(**err_l), circ.heads,
                           list(circ.conditions), err, None, None, None, limiting=limiting)
        if circ.heads:
            texts = {x.name: x.report[0] for x in sh.windows}
            piece.circuit_fvu_effective, piece.circuit_fvu_true = _circuit_fvus(w, l, view, circ, texts)
        ex = replace(build_explainer(view, circ), scale=sh.sa.mlp_scale[l])
        sh.layers[l] = (view, circ, ex, piece)
    return sh.layers[l]


@torch.no_grad()
def build_later(w: ModelWeights, layer: int, cs: CircuitSettings | None = None, s: LaterSettings | None = None,
                *, shared: Shared | None = None) -> LaterCircuit:
    """Effective embeddings, circuits and propagation for every layer ``<= layer``, and the token model of the
    MLP of ``layer`` (see the module docstring).  ``shared``: reuse the runs and circuits of another ``L``."""
    check_index("layer", layer, w.n_layers)
    s = s or LaterSettings()
    sh = shared or prepare(w, layer, cs, s)
    sa, n_min = sh.sa, sh.n_min
    lc = LaterCircuit(layer, [], sh.windows, {}, {}, {}, {}, {}, sa.mlp_scale[layer], n_min, scale_dim=w.d_model)
    for l in range(layer + 1):
        lc.views[l], lc.circuits[l], lc.explainers[l], piece = _layer(w, l, sh, s)
        piece = replace(piece)
        if l < layer:
            lc.G[l], lc.R[l] = propagation(w, sa, l, layer)
            piece.propagation_norm = float(torch.linalg.matrix_norm(lc.G[l].double(), ord=2))
        lc.pieces.append(piece)
    if layer > 0:
        per = [layer_terms(lc, t, to_residual=True) for t in sa.tokens]
        lc.direct, lc.gain = fit_gains(w, sa, layer, {l: torch.stack([p[l] for p in per]) for l in range(layer)},
                                       s.prior_count)
        for p in lc.pieces[:layer]:
            p.propagation_gain = lc.gain[p.layer]
    else:
        lc.direct = estimate(w, 0, sa, prior_count=s.prior_count)
    report = torch.cat([x.report for x in sh.windows])
    off_rep = torch.stack([earlier_terms(lc, t, to_residual=True) for t in report])
    lc.approximation_direct = Approximation(**approximation_error(w, lc.direct, report, n_min=n_min, offset=off_rep,
                                                                  resid=sh.held[layer]))
    W, _ = mlp_input_weights(w, layer)
    lc.token_model = TokenModel(_token_parts(w, lc), W, lc.scale)
    return lc
