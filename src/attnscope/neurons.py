r"""Context-sensitive neurons from the weights and one calibration text (method §8-9).

Composing the contextual circuit with the next MLP's input weights gives every token a score for every
neuron, ``S = centre(Ext) W_in' / s`` (``W_in'``: input weights with the norm gain folded, ``s``: the
norm's scale, constant, measured on the calibration text).  The contextual heads then add
``sum_i K_n(i) S[x_i, k]`` to neuron ``k``'s pre-activation: a kernel-weighted average of per-token
evidence, i.e. a Naive-Bayes-like reading of the surrounding text.

**Selection (scale-free).**  For neuron ``k`` the *swing* is how far its contextual input moves when the
window holds only its ``top_m`` highest-scoring tokens (a coherent token distribution) instead of the
calibration text's distribution, ``mean(top_m S_k) - E_cal[S_k]`` (and the same for the lowest-scoring
tokens).  The *effect* is the larger swing divided by the standard deviation of the neuron's true
pre-activation over the calibration text; neurons with ``effect >= effect_min`` are reported.  Both are
in units of the neuron's own pre-activation, so the criterion does not depend on weight scales.

Neurons are kept when their effect is at least ``effect_min`` *and* an outlier among the layer's neurons
(robust z-score ``(effect - median) / (1.4826 MAD) >= outlier_z``): a top-m set of any column swings a
little, a context neuron swings exceptionally.

**Verification.**  On held-out texts, the heads' true contribution to the pre-activation (exact head
outputs through the same linearised norm) is compared with the prediction, per neuron: Pearson ``r`` and
``FVU = sum (y - y_hat)^2 / sum (y - mean y)^2`` over all positions ``n >= min_position`` of all texts.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .circuit import Circuit, mlp_input_weights, true_head_output
from .decomposition import centre
from .errors import AttnscopeError
from .models import ModelWeights
from .texts import bundled_texts, text_tokens


@dataclass
class NeuronSettings:
    top_m: int = 100  # size of the coherent token set that defines a neuron's swing
    effect_min: float = 2.0  # report neurons whose swing is >= this many calibration std of the pre-activation
    outlier_z: float = 3.0  # ... and whose effect is an outlier among the layer's neurons (robust z >= this)
    max_neurons: int = 64  # explanation cards / verifications kept (highest effect first)
    n_top_tokens: int = 20
    eval: list[str] | None = None  # held-out texts (default: bundled texts other than the calibration)
    eval_tokens: int | None = None  # tokens per eval text (default: the circuit's n_ctx)
    chunk: int = 1024  # neurons scored at a time (memory: d_vocab x chunk)


@dataclass
class NeuronRecord:
    layer: int
    index: int
    effect: float
    score: float  # the larger swing, in pre-activation units
    swing_positive: float
    swing_negative: float
    top_positive_tokens: list[tuple[str, float]]
    top_negative_tokens: list[tuple[str, float]]
    label: str | None
    label_negative: str | None
    fired_on_calibration: bool
    r: float
    fvu: float
    r_per_text_median: float
    mean_pre_by_text: dict[str, float]
    positive_text: str
    negative_text: str


@dataclass
class NeuronResult:
    model: dict
    circuit: dict
    settings: dict
    n_scored: int
    n_selected: int
    records: list[NeuronRecord]
    fidelity: dict
    denominators: dict
    traces: dict = field(repr=False, default_factory=dict)  # neuron -> text -> {true, pred, pre}

    def summary(self) -> dict:
        import statistics as st

        rs = [r.r for r in self.records]
        fv = [r.fvu for r in self.records]
        return {"n_heads": len(self.circuit["heads"]), "heads": self.circuit["heads"], "n_neurons_scored": self.n_scored,
                "n_neurons_found": self.n_selected, "n_verified": len(self.records),
                "median_r": st.median(rs) if rs else None, "median_fvu": st.median(fv) if fv else None,
                "n_not_fired_on_calibration": sum(not r.fired_on_calibration for r in self.records),
                "labels": sorted({r.label for r in self.records if r.label})}

    def to_json(self) -> dict:
        return {"model": self.model, "circuit": self.circuit, "settings": self.settings, "summary": self.summary(),
                "circuit_fidelity": self.fidelity, "denominator_stability": self.denominators,
                "neurons": [asdict(r) for r in self.records]}

    def save(self, out: str | Path) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "neurons.json").write_text(json.dumps(self.to_json(), indent=1))
        (out / "traces.json").write_text(json.dumps(self.traces))
        return out


# --------------------------------------------------------------------------------------------------
# Automatic labels: lexicons and scripts of the top tokens
# --------------------------------------------------------------------------------------------------

LEXICONS: dict[str, set[str]] = {
    "English function words": set("the and of to a in that is was he for it with as his on be at by i this had not are but "
                                  "from or have an they which you were her she all would there their we him been has when "
                                  "who will more no if out so said what up its about into than them can only".split()),
    "Spanish": set("de la que el en y los del se las por un para con no una su al lo como más pero sus le ya este sí "
                   "porque esta entre cuando muy sin sobre también me hasta hay donde quien desde todo nos durante "
                   "todos uno les ni contra otros ese eso ante ellos esto antes algunos qué unos yo otro otras otra él "
                   "tanto esa estos mucho quienes nada muchos cual poco ella estar estas algo es son ser hace tiene "
                   "vida amor hombre mujer dios siempre nunca bien mal día hacer puede".split()),
    "German": set("der die und den von zu das mit sich des auf für ist im dem nicht ein eine als auch es an werden aus "
                  "er hat dass daß sie nach wird bei einer um am sind noch wie einem über einen so zum war haben nur "
                  "oder aber vor zur bis mehr durch man sein wurde sei ich du wenn was kann mir mich dich nichts immer "
                  "ganz schon wir ihr ihm ihn gibt keine kein gut leben mann frau welt liebe gott heute".split()),
    "Python code": set("def self return import from class if else elif none true false for while try except raise with "
                       "as lambda yield pass not and or is __init__ args kwargs isinstance len str int print assert "
                       "dict list tuple object super name value key msg data result".split()),
    "Early Modern English (verse/drama)": set("thou thee thy thine hath doth art ye hast shalt wilt nay ay 'tis ere whence "
                                              "thence hither dost methinks o lord sir king queen heaven thus mine "
                                              "fair good sweet love exeunt enter".split()),
    "government / politics": set("congress government states united nation national public people president federal law "
                                 "country citizens policy treaty revenue department administration legislation act "
                                 "economic program tax america american peace security constitution secretary "
                                 "military war". split()),
    "sea / whaling": set("whale ship sea captain deck boat sail ahab sailors harpoon ocean crew voyage mast water whales "
                         "sperm boats queequeg stubb starbuck pequod".split()),
}
CHAR_HINTS = {"Spanish": set("ñáéíóú¿¡"), "German": set("äöüß")}
SPELLING = {  # dialect labels from spelling patterns (the method's Commonwealth vs American English neuron)
    "British/Commonwealth spelling": re.compile(r"(^|[a-z])(is(e|ed|es|ing|ation|ations)|our|ours|oured|ouring|"
                                                r"tre|tres|ogue|ogues|amme|ammes|yse|ysed|lled|lling)$|^(whilst|"
                                                r"amongst|lads|rubbish|queue|cheque|tyre|grey|mum|pupils|favour|colour)$"),
    "American spelling": re.compile(r"(^|[a-z])(iz(e|ed|es|ing|ation|ations)|or|ors|ored|oring|ter|ters|og|ogs|"
                                    r"yze|yzed|led|ling)$|^(gotten|gray|mom|color|favor|center|program|check|tire)$"),
}


def _clean(tok: str) -> str:
    return tok.replace("Ġ", " ").replace("▁", " ").replace("##", "").replace("Ċ", "\n").strip().lower()


def _script(text: str) -> str | None:
    names = [unicodedata.name(c, "").split(" ")[0] for c in text if c.isalpha()]
    return max(set(names), key=names.count) if names else None


def auto_label(tokens: list[str]) -> str | None:
    """A short label from lexicons and scripts when the tokens clearly belong to one language, script, genre or topic; else ``None``.

    Rule: a lexicon (or script) must cover at least 20% of the tokens and at least 4 of them, and beat the
    runner-up by half again.  Code is also recognised by identifier/punctuation-shaped tokens.
    """
    words = [_clean(t) for t in tokens if _clean(t)]
    if not words:
        return None
    scripts = [s for s in (_script(w) for w in words) if s]
    if scripts:
        top = max(set(scripts), key=scripts.count)
        if top != "LATIN" and scripts.count(top) >= max(4, 0.4 * len(words)):
            return f"{top.title()} script"
    hits: dict[str, int] = {}
    for name, lex in LEXICONS.items():
        n = sum(w in lex for w in words)
        if name in CHAR_HINTS:
            n += sum(any(c in CHAR_HINTS[name] for c in w) and w not in lex for w in words)
        if name == "Python code":  # identifier- and punctuation-shaped tokens
            n += sum(bool(re.search(r"[_(){}\[\]=:.]|^\s{2,}", w)) and w not in lex for w in words)
        hits[name] = n
    for name, pat in SPELLING.items():  # counted for words of 5+ letters only
        hits[name] = sum(len(w) >= 5 and bool(pat.search(w)) for w in words)
    ranked = sorted(hits.items(), key=lambda kv: -kv[1])
    (best, nb), (_, n2) = ranked[0], ranked[1]
    if nb >= max(4, 0.2 * len(words)) and nb >= 1.5 * n2:
        return best
    return None


CORPUS_LABELS = {
    "code_python": "Python code", "de_fortunes": "German", "es_fortunes": "Spanish",
    "en_shakespeare": "Shakespearean drama", "en_milton": "Miltonic verse", "en_moby_dick": "19th-c. novel (Moby-Dick)",
    "en_speeches_1790_1899": "19th-c. US political speech", "en_speeches_1900_2016": "20th-c. US political speech",
}


def corpus_label(token_ids: list[int], unigrams: dict[str, Tensor], min_ratio: float = 2.0) -> str | None:
    """Label from the labelled bundled corpora: the context whose unigram distribution over-represents the
    tokens most (mean log-ratio to the average distribution), if it beats the runner-up by ``min_ratio``
    (as a likelihood ratio) and is itself enriched ``min_ratio``-fold."""
    if not unigrams:
        return None
    names = list(unigrams)
    P = torch.stack([unigrams[n] for n in names])  # [C, V]
    ids = torch.tensor(token_ids)
    lr = (P[:, ids].log() - P.mean(0)[ids].log()[None]).mean(1)  # [C]
    top = torch.topk(lr, 2)
    if float(top.values[0]) >= torch.log(torch.tensor(min_ratio)) and float(top.values[0] - top.values[1]) >= float(
        torch.log(torch.tensor(min_ratio))
    ):
        name = names[int(top.indices[0])]
        return CORPUS_LABELS.get(name, name)
    return None


def bundled_unigrams(tokenizer, d_vocab: int) -> dict[str, Tensor]:
    """Add-one-smoothed unigram distribution of each bundled text (the labelled contexts)."""
    from .texts import open_source, tokenize

    out = {}
    for name in bundled_texts():
        ids = torch.as_tensor(tokenize(open_source(f"bundled:{name}"), tokenizer))
        c = torch.bincount(ids.clamp(max=d_vocab - 1), minlength=d_vocab).double() + 1.0
        out[name] = c / c.sum()
    return out


# --------------------------------------------------------------------------------------------------


def default_eval_texts(circ: Circuit) -> list[str]:
    cal = circ.settings["calibration"]
    return [f"bundled:{n}" for n in bundled_texts() if f"bundled:{n}" != cal]


def _decode(tok, ids: list[int]) -> list[str]:
    return [tok.convert_tokens_to_string([t]) for t in tok.convert_ids_to_tokens(ids)]


@torch.no_grad()
def score_neurons(w: ModelWeights, circ: Circuit, settings: NeuronSettings | None = None, *,
                  progress: bool = True):
    """Swing and effect of every neuron of the layer-0 MLP, chunked over neurons.

    Returns ``(effect [d_mlp], swing_pos [d_mlp], swing_neg [d_mlp], pre_cal [T, d_mlp])``."""
    from tqdm.auto import tqdm

    s = settings or NeuronSettings()
    W, _ = mlp_input_weights(w)
    ext = centre(circ.ext, w) / circ.mlp_scale  # [V, d]
    cal = circ.calibration_tokens.to(w.device)
    body = cal[1:] if w.prepend_bos else cal
    p_cal = torch.bincount(body, minlength=w.d_vocab).to(ext.dtype)
    p_cal = p_cal / p_cal.sum()
    mask = circ.token_mask
    _, pre_cal, _ = true_head_output(w, circ.heads, cal)
    n_min = circ.settings["min_position"]
    std_cal = pre_cal[n_min:].std(0) + 1e-6
    m = min(s.top_m, int(mask.sum()))
    d_mlp = W.shape[1]
    sw_pos = torch.empty(d_mlp, dtype=torch.float32, device=w.device)
    sw_neg = torch.empty_like(sw_pos)
    ext_m = ext[mask]
    mean_cal = (p_cal @ ext) @ W  # [d_mlp]
    for c0 in tqdm(range(0, d_mlp, s.chunk), desc="neurons: score", disable=not progress, unit="chunk"):
        S = ext_m @ W[:, c0 : c0 + s.chunk]  # [V_masked, chunk]
        top = S.topk(m, dim=0).values.mean(0)
        bot = (-S).topk(m, dim=0).values.mean(0)
        sw_pos[c0 : c0 + s.chunk] = top - mean_cal[c0 : c0 + s.chunk]
        sw_neg[c0 : c0 + s.chunk] = bot + mean_cal[c0 : c0 + s.chunk]
    effect = torch.maximum(sw_pos, sw_neg) / std_cal
    return effect, sw_pos, sw_neg, pre_cal


@torch.no_grad()
def find_neurons(w: ModelWeights, circ: Circuit, settings: NeuronSettings | None = None, *,
                 progress: bool = True) -> NeuronResult:
    """Score, select, explain and verify the context-sensitive neurons of the layer-0 MLP."""
    from .circuit import circuit_fidelity, denominator_stability

    s = settings or NeuronSettings()
    effect, sw_pos, sw_neg, pre_cal = score_neurons(w, circ, s, progress=progress)
    order = torch.argsort(effect, descending=True)
    med = effect.median()
    mad = (effect - med).abs().median() * 1.4826 + 1e-12
    threshold = max(s.effect_min, float(med + s.outlier_z * mad))
    selected = [int(k) for k in order if effect[k] >= threshold]
    kept = selected[: s.max_neurons]
    eval_specs = s.eval if s.eval is not None else default_eval_texts(circ)
    if not eval_specs:
        raise AttnscopeError("no held-out texts to verify on; pass --eval PATH")
    T = s.eval_tokens or circ.T
    bos = w.bos_token_id if w.prepend_bos else None
    n_min = circ.settings["min_position"]
    texts = {}
    for spec in eval_specs:
        name = spec.split(":", 1)[1] if spec.startswith("bundled:") else Path(spec).stem
        texts[name] = text_tokens(spec, w.tokenizer, max_tokens=min(T, circ.T), min_tokens=n_min + 8,
                                  bos_token_id=bos)
    W, b = mlp_input_weights(w)
    Wk = W[:, kept]
    tok = w.tokenizer
    n_min_cal = n_min
    fired = (pre_cal[n_min_cal:, kept] > 0).any(0) if kept else torch.zeros(0, dtype=torch.bool)
    # offset of the terms the circuit does not model, averaged over the calibration text
    cal = circ.calibration_tokens.to(w.device)
    y_cal, _, _ = true_head_output(w, circ.heads, cal)
    other = (pre_cal[:, kept] - centre(y_cal, w) @ Wk / circ.mlp_scale)[n_min:].mean(0) if kept else None
    ys: dict[str, Tensor] = {}
    yh: dict[str, Tensor] = {}
    pres: dict[str, Tensor] = {}
    outs: dict[str, Tensor] = {}
    for name, toks in texts.items():
        toks = toks.to(w.device)
        y, pre, _ = true_head_output(w, circ.heads, toks)
        outs[name] = y
        ys[name] = (centre(y, w) @ Wk / circ.mlp_scale)[n_min:]
        yh[name] = (centre(circ.summary(toks), w) @ Wk / circ.mlp_scale)[n_min:]
        pres[name] = pre[n_min:, kept]
    records = []
    traces: dict[str, dict] = {}
    keep = circ.token_mask.clone()
    keep[[i for i in tok.all_special_ids if i < len(keep)]] = False  # special tokens are not evidence
    mask_ids = torch.nonzero(keep).squeeze(1)
    unigrams = bundled_unigrams(tok, w.d_vocab)
    # scores of the kept neurons over the unmasked vocabulary, one product for all: [V_kept, n_kept]
    S_kept = (centre(circ.ext, w)[mask_ids] / circ.mlp_scale) @ Wk
    for j, k in enumerate(kept):
        y = torch.cat([ys[n][:, j] for n in texts]).double()
        yhat = torch.cat([yh[n][:, j] for n in texts]).double()
        r = float(torch.corrcoef(torch.stack([y, yhat]))[0, 1])
        fvu = float(((y - yhat) ** 2).sum() / ((y - y.mean()) ** 2).sum())
        per_text = [float(torch.corrcoef(torch.stack([ys[n][:, j], yh[n][:, j]]).double())[0, 1]) for n in texts]
        per_text = [x for x in per_text if x == x]
        means = {n: float(pres[n][:, j].mean()) for n in texts}
        pos_t, neg_t = max(means, key=means.get), min(means, key=means.get)
        S = S_kept[:, j]
        tp = S.topk(s.n_top_tokens)
        tn = (-S).topk(s.n_top_tokens)
        top_pos = list(zip(_decode(tok, mask_ids[tp.indices].tolist()), [round(float(v), 4) for v in tp.values]))
        top_neg = list(zip(_decode(tok, mask_ids[tn.indices].tolist()), [round(-float(v), 4) for v in tn.values]))
        pos_ids, neg_ids = mask_ids[S.topk(50).indices].tolist(), mask_ids[(-S).topk(50).indices].tolist()
        label = auto_label(_decode(tok, pos_ids)) or corpus_label(pos_ids, unigrams)
        label_neg = auto_label(_decode(tok, neg_ids)) or corpus_label(neg_ids, unigrams)
        records.append(NeuronRecord(
            layer=0, index=k, effect=float(effect[k]), score=float(max(sw_pos[k], sw_neg[k])),
            swing_positive=float(sw_pos[k]), swing_negative=float(sw_neg[k]), top_positive_tokens=top_pos,
            top_negative_tokens=top_neg, label=label, label_negative=label_neg,
            fired_on_calibration=bool(fired[j]), r=r, fvu=fvu,
            r_per_text_median=float(torch.tensor(per_text).median()) if per_text else float("nan"),
            mean_pre_by_text=means, positive_text=pos_t, negative_text=neg_t))
        traces[str(k)] = {n: {"true": ys[n][:, j].tolist(), "pred": yh[n][:, j].tolist(),
                              "pre": pres[n][:, j].tolist(), "pred_pre": (yh[n][:, j] + other[j]).tolist()}
                          for n in (pos_t, neg_t)}
    fid = circuit_fidelity(w, circ, texts, outs)
    den = denominator_stability(w, circ, texts)
    traces["_denominators"] = {name: v.pop("Z_trace") for name, v in den.items()}
    return NeuronResult(model=w.info(), circuit=circ.to_json(), settings=asdict(s), n_scored=int(effect.numel()),
                        n_selected=len(selected), records=records, fidelity=fid, denominators=den, traces=traces)
