"""Training dynamics: how positional kernels, contextual heads and context neurons form across checkpoints.

``attnscope evolution CHECKPOINT ...`` takes model folders (or one folder of checkpoint folders, such as
``attnscope train-demo --steps S --save-every N`` writes, or hub ``id@revision`` specs) and analyses each
checkpoint like any model: kernels (every head's category, N_eff, decay length, sink mass), the layer-0
contextual circuit (every head's detection criteria and every condition), the neurons the method finds,
and the ground truth: each neuron's one-vs-rest effect size per bundled context, from its true
pre-activations on held-out text.  The checkpoints are then lined up by step (:func:`timeline`).

Each checkpoint's summary is cached under the model's fingerprint and the settings, so adding a checkpoint
recomputes only that one; checkpoints are analysed one at a time and only their small summaries are kept,
so memory does not grow with their number.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from attnscope.circuit.build import Circuit, CircuitSettings, build_circuit
from attnscope.circuit.result import HEAD_CRITERIA
from attnscope.core.cache import file_sha256, read_or_drop, write_json
from attnscope.core.errors import AttnscopeError, ConditionFailedError, check_index
from attnscope.core.executor import LOCAL, Executor
from attnscope.core.texts import decode_tokens, tokenizer_sha256
from attnscope.evolution.jobs import run_jobs
from attnscope.evolution.timeline import (  # noqa: F401  (re-exported)
    CRITERIA,
    TRACKED_CONTEXTS,
    Timeline,
    timeline,
)
from attnscope.kernels.analysis import KernelSettings, analyse_kernels
from attnscope.later.evaluate import find_later_neurons
from attnscope.later.method import LaterSettings
from attnscope.models import ModelWeights, cache_dir, load_model
from attnscope.models.resolve import split_revision
from attnscope.neurons.contrast import build_token_model, pre_stats
from attnscope.neurons.find import NeuronSettings, held_out_windows, label, one_vs_rest_effects, score, select
from attnscope.neurons.result import D_MIN

__all__ = ["EvolutionSettings", "CheckpointRef", "CheckpointSummary", "EvolutionResult", "discover_checkpoints",
           "summarise_checkpoint", "run_evolution", "ground_truth", "timeline"]

SCHEMA_VERSION = 5
PARALLEL_NOTE = ("parallel attention + MLP (GPT-NeoX): the layer-0 MLP does not read layer-0 attention, so the "
                 "layer-0 neuron method does not apply; kernels, heads and the ground truth are reported, the "
                 "method's neurons are not (track a later MLP layer with --layer 1 or deeper)")


@dataclass
class EvolutionSettings:
    """Everything that determines one checkpoint's summary (part of its cache key)."""

    kernel: KernelSettings = field(default_factory=lambda: KernelSettings(n_samples=16, n_heldout=4))
    circuit: CircuitSettings = field(default_factory=CircuitSettings)
    neuron: NeuronSettings = field(default_factory=NeuronSettings)  # max_windows: held-out windows per text
    top_k: int = 10  # top neurons (by the method's predicted sensitivity) followed across steps
    layer: int = 0  # the MLP layer whose neurons are tracked (>= 1: the later-layer method)

    def to_json(self) -> dict:
        return {"kernel": asdict(self.kernel), "circuit": asdict(self.circuit), "neuron": asdict(self.neuron),
                "top_k": self.top_k, "layer": self.layer}


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


@dataclass
class CheckpointRef:
    """One checkpoint: what to load, and its step / tokens seen / held-out loss where recorded."""

    spec: str
    step: int | None
    tokens_seen: int | None = None
    heldout_loss: float | None = None


def _is_model_dir(p: Path) -> bool:
    return (p / "config.json").is_file()


def _ref_of_folder(p: Path) -> CheckpointRef:
    rec = {}
    if (p / "training.json").is_file():
        rec = json.loads((p / "training.json").read_text())
    step = rec.get("step", rec.get("steps"))
    if step is None:
        digits = re.findall(r"\d+", p.name)
        step = int(digits[-1]) if digits else None
    loss = rec.get("heldout_loss", (rec.get("eval") or {}).get("overall", {}).get("loss"))
    return CheckpointRef(str(p), step, rec.get("tokens_seen"), loss)


def discover_checkpoints(specs: list[str]) -> list[CheckpointRef]:
    """Checkpoints of ``specs`` ordered by step: model folders, folders of checkpoint folders (a folder
    with ``step-*`` model subfolders counts as its series), or hub ``id@revision`` (step from the revision)."""
    if not specs:
        raise AttnscopeError("no checkpoints given; pass model folders or one folder of checkpoint folders")
    refs: list[CheckpointRef] = []
    for spec in specs:
        p = Path(spec).expanduser()
        if p.is_dir():
            subs = sorted(d for d in p.iterdir() if d.is_dir() and _is_model_dir(d))
            if subs:
                refs += [_ref_of_folder(d) for d in subs]
            elif _is_model_dir(p):
                refs.append(_ref_of_folder(p))
            else:
                raise AttnscopeError(f"{spec} is neither a model folder (config.json) nor a folder of checkpoint "
                                     "folders; pass model folders or the --out folder of train-demo --save-every")
        elif p.exists() or spec.startswith((".", "/", "~")):
            raise AttnscopeError(f"no model folder at {spec}; pass model folders or a folder of checkpoint folders")
        else:
            _, rev = split_revision(spec)
            digits = re.findall(r"\d+", rev or "")
            refs.append(CheckpointRef(spec, int(digits[-1]) if digits else None))
    _refuse_duplicates(refs)
    if all(r.step is not None for r in refs):
        refs.sort(key=_known_step)
    return refs


def _known_step(r: CheckpointRef) -> int:
    assert r.step is not None, "checkpoints are sorted by step only when every one has a step"
    return r.step


def _refuse_duplicates(refs: list[CheckpointRef]) -> None:
    """The same checkpoint twice (one folder by two paths, or two folders with identical weight files) would
    report a step that did not change anything; refused."""
    seen: dict[str, str] = {}
    for r in refs:
        p = Path(r.spec).expanduser()
        keys = [f"path:{os.path.realpath(p)}" if p.is_dir() else f"hub:{r.spec}"]
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".bin") and f.is_file())
            if files:
                keys.append("weights:" + "|".join(file_sha256(f) for f in files))
        for k in keys:
            if k in seen:
                what = "the same checkpoint" if k.startswith(("path:", "hub:")) else "identical weights"
                raise AttnscopeError(f"checkpoints {seen[k]} and {r.spec} are {what}; pass each checkpoint once")
            seen[k] = r.spec


# --------------------------------------------------------------------------------------------------
# One checkpoint's summary
# --------------------------------------------------------------------------------------------------


@dataclass
class HeadPoint:
    layer: int
    head: int
    category: str
    n_eff: float
    decay_length: float | None
    sink_mass: float | None  # median attention on the first position (kernels' sink_mass; None: not measured)


@dataclass
class HeadCriteria:
    """A layer-0 head's detection criteria (True = passes) and whether it was chosen as contextual."""

    head: int
    chosen: bool
    criteria: dict[str, bool]
    measured: dict[str, float | None] = field(default_factory=dict)  # criterion -> its measured value


@dataclass
class ConditionPoint:
    name: str
    ok: bool
    measured: float
    threshold: float


@dataclass
class NeuronPoint:
    index: int
    rank: int  # 1 = the method's most context-sensitive neuron of the layer-0 MLP
    effect: float  # the method's sensitivity: max over contrasts of |predicted d|
    label: str | None
    top_tokens: list[str]


@dataclass
class ContextNeuron:
    """The neuron with the largest one-vs-rest effect size for one context (ground truth)."""

    context: str
    index: int
    d: float  # one-vs-rest effect size (true pre-activations, reporting half of the held-out windows)
    n_true: int  # neurons with d >= D_MIN for this context
    rank: int | None  # its rank by the method's predicted sensitivity; None: no circuit
    selected: bool  # the method reports it (sensitivity above the threshold measured on the tuning half)


@dataclass
class CheckpointSummary:
    spec: str
    step: int | None
    tokens_seen: int | None
    heldout_loss: float | None
    fingerprint: str
    heads: list[HeadPoint]
    contextual_heads: list[int]
    head_criteria: list[HeadCriteria]
    conditions: list[ConditionPoint]
    circuit_error: str | None
    n_neurons_selected: int
    top_neurons: list[NeuronPoint]
    context_neurons: list[ContextNeuron]
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> CheckpointSummary:
        d = dict(d)
        d["heads"] = [HeadPoint(**h) for h in d["heads"]]
        d["head_criteria"] = [HeadCriteria(**h) for h in d["head_criteria"]]
        d["conditions"] = [ConditionPoint(**c) for c in d["conditions"]]
        d["top_neurons"] = [NeuronPoint(**n) for n in d["top_neurons"]]
        d["context_neurons"] = [ContextNeuron(**c) for c in d["context_neurons"]]
        return cls(**d)


def _head_points(w: ModelWeights, s: EvolutionSettings, cache: bool) -> list[HeadPoint]:
    res = analyse_kernels(w, s.kernel, cache=cache, progress=False)
    return [HeadPoint(r.layer, r.head, r.category, r.n_eff, r.decay_length, r.sink_mass) for r in res.records]


def _measured(d) -> dict[str, float | None]:
    """Each detection criterion's measured value: N_eff, std log f, decomposition TV, CV(Z), shared-kernel TV."""
    vals = (d.n_eff, d.logit_std, d.decomposition_tv, d.denominator_cv, d.share_tv)
    return {c.value: (None if v is None else float(v)) for c, v in zip(HEAD_CRITERIA, vals)}


def _criteria(circ: Circuit) -> list[HeadCriteria]:
    return [HeadCriteria(d.head, d.chosen, {c.value: c not in d.failed for c in HEAD_CRITERIA}, _measured(d))
            for d in circ.decisions]


@torch.no_grad()
def ground_truth(w: ModelWeights, circ: Circuit, s: EvolutionSettings) -> tuple[list, Tensor, Tensor]:
    """``(windows, d_tune, d_report)``: true one-vs-rest effect sizes ``[n_sources, d_mlp]`` of every layer-0
    neuron on the held-out windows of each bundled text (the tuning and the reporting half), exactly as
    :func:`~attnscope.neurons.find.find_neurons` measures them."""
    windows = held_out_windows(w, circ, s.neuron.eval, s.neuron.max_windows)
    n_min = circ.settings.min_position
    d_tune = one_vs_rest_effects([pre_stats(w, x.tune, n_min) for x in windows])
    d_report = one_vs_rest_effects([pre_stats(w, x.report, n_min) for x in windows])
    return windows, d_tune, d_report


def _neurons(w: ModelWeights, circ: Circuit, s: EvolutionSettings, windows: list, d_tune: Tensor, d_report: Tensor):
    """The method's ranking (score), its measured threshold (select, on the tuning half), the top-k neurons,
    and each tracked context's strongest true neuron on the reporting half with its rank."""
    tm = build_token_model(w, circ)
    sc = score(w, circ, windows, s.neuron, tm)
    thr = select(sc, d_tune, s.neuron.precision_target)
    order = sc.sensitivity.argsort(descending=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(1, len(order) + 1)
    idx = order[: s.top_k].tolist()
    ts = tm.token_scores(torch.tensor(idx, device=tm.W_in.device)).cpu()  # [d_vocab, k]
    top = []
    for j, k in enumerate(idx):
        pos = decode_tokens(w.tokenizer, ts[:, j].topk(8).indices.tolist())
        neg = decode_tokens(w.tokenizer, (-ts[:, j]).topk(8).indices.tolist())
        top.append(NeuronPoint(k, j + 1, float(sc.sensitivity[k]), label(pos, neg)[0], pos))
    names = [x.name for x in windows]
    ctx = [_context_neuron(c, d_report[names.index(c)], rank, thr.n_passed) for c in TRACKED_CONTEXTS if c in names]
    return thr.n_passed, top, ctx


def _tracked_neurons(w: ModelWeights, circ: Circuit | None, any_circ: Circuit, s: EvolutionSettings):
    """``(n_selected, top neurons, context neurons)`` of the tracked MLP layer at one checkpoint: layer 0 by the
    layer-0 method (when there is a circuit and the MLP reads it), a later layer by the later-layer method."""
    if s.layer > 0:
        return later_neurons(w, s, s.layer)
    windows, d_tune, d_report = ground_truth(w, any_circ, s)
    if circ is not None and not w.parallel_attn_mlp:
        return _neurons(w, circ, s, windows, d_tune, d_report)
    names = [x.name for x in windows]
    return 0, [], [_context_neuron(c, d_report[names.index(c)], None, 0) for c in TRACKED_CONTEXTS if c in names]


def _context_neuron(context: str, row: Tensor, rank: Tensor | None, n_selected: int) -> ContextNeuron:
    k = int(row.argmax())
    r = None if rank is None else int(rank[k])
    return ContextNeuron(context, k, float(row[k]), int((row >= D_MIN).sum()), r, r is not None and r <= n_selected)


def _summary_key(w: ModelWeights, s: EvolutionSettings) -> str:
    blob = json.dumps({"model": w.fingerprint(), "settings": s.to_json(), "dtype": str(w.dtype),
                       "tokenizer": tokenizer_sha256(w.tokenizer), "v": SCHEMA_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_summary(ref: CheckpointRef, s: EvolutionSettings, cache: bool, device: str, dtype: str
                   ) -> tuple[ModelWeights, Path, CheckpointSummary | None]:
    """The checkpoint's weights, its summary's cache path, and the cached summary (``None``: not cached)."""
    w = load_model(ref.spec, device=device, dtype=dtype)
    check_index("layer", s.layer, w.n_layers)  # before any analysis: one line, exit 2
    path = cache_dir() / "evolution" / f"{_summary_key(w, s)}.json"
    out = read_or_drop(path, lambda p: CheckpointSummary.from_json(json.loads(p.read_text()))) if cache else None
    if out is not None:  # a corrupt entry was dropped (one logged line) and is recomputed
        out.spec, out.step, out.tokens_seen, out.heldout_loss = ref.spec, ref.step, ref.tokens_seen, ref.heldout_loss
    return w, path, out


@torch.no_grad()
def summarise_checkpoint(ref: CheckpointRef, s: EvolutionSettings, *, cache: bool = True,
                         device: str = "cpu", dtype: str = "float32") -> CheckpointSummary:
    """Analyse one checkpoint (or read its cached summary); nothing but the summary is kept."""
    w, path, out = cached_summary(ref, s, cache, device, dtype)
    if out is not None:
        return out
    out = summarise_weights(w, ref, s, cache)
    if cache:
        write_json(path, out.to_json(), indent=None)
    return out


def summarise_weights(w: ModelWeights, ref: CheckpointRef, s: EvolutionSettings, cache: bool) -> CheckpointSummary:
    """The summary of one loaded checkpoint (``cache``: the kernels' cache; the summary's is the caller's)."""
    t0 = time.time()
    heads = _head_points(w, s, cache)
    circ, err = None, None
    try:
        circ = build_circuit(w, s.circuit)
    except ConditionFailedError as e:  # no contextual head: still record every head's criteria
        err = str(e)
        forced = build_circuit(w, replace(s.circuit, heads=list(range(w.n_heads))))
    crit = _criteria(circ or forced)
    for c in crit if circ is None else []:
        c.chosen = False
    conds = [] if circ is None else [ConditionPoint(c.name, bool(c.ok), float(c.measured), float(c.threshold))
                                     for c in circ.conditions]
    notes = [PARALLEL_NOTE] if w.parallel_attn_mlp and s.layer == 0 else []
    n_sel, top, ctx = _tracked_neurons(w, circ, circ or forced, s)
    return CheckpointSummary(ref.spec, ref.step, ref.tokens_seen, ref.heldout_loss, w.fingerprint(), heads,
                             [] if circ is None else list(circ.heads), crit, conds, err, n_sel, top, ctx,
                             time.time() - t0, notes)


# --------------------------------------------------------------------------------------------------
# The series
# --------------------------------------------------------------------------------------------------


@dataclass
class EvolutionResult:
    """Every checkpoint's summary, ordered by step, and the formation timeline derived from them."""

    settings: dict
    checkpoints: list[CheckpointSummary]
    timeline: Timeline
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict:
        return {"schema_version": self.schema_version, "settings": self.settings, "timeline": self.timeline.to_json(),
                "checkpoints": [c.to_json() for c in self.checkpoints]}

    def save(self, out: str | Path) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "evolution.json"
        path.write_text(json.dumps(self.to_json(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> EvolutionResult:
        p = Path(path)
        d = json.loads((p / "evolution.json" if p.is_dir() else p).read_text())
        if d.get("schema_version") != SCHEMA_VERSION:
            raise AttnscopeError(f"{path} has evolution schema {d.get('schema_version')}, expected {SCHEMA_VERSION}; "
                                 "rerun `attnscope evolution`")
        return cls(d["settings"], [CheckpointSummary.from_json(c) for c in d["checkpoints"]],
                   Timeline.from_json(d["timeline"]), d["schema_version"])
















def run_evolution(specs: list[str], settings: EvolutionSettings | None = None, *, cache: bool = True,
                  device: str = "cpu", dtype: str = "float32", log=None,
                  executor: Executor | None = None) -> EvolutionResult:
    """Summarise every checkpoint of ``specs`` (cached) and derive the timeline: one at a time here, or, with a
    distributed ``executor``, one job per checkpoint not found in the cache (the cache is read here first)."""
    s = settings or EvolutionSettings()
    refs = discover_checkpoints(specs)
    if executor is not None and executor is not LOCAL:
        out = run_jobs(refs, s, cache, device, dtype, log, executor, cached_summary, summarise_weights)
        return EvolutionResult(s.to_json(), out, timeline(out))
    out = []
    for i, ref in enumerate(refs):
        t = time.time()
        out.append(summarise_checkpoint(ref, s, cache=cache, device=device, dtype=dtype))
        if log:
            log(f"[{i + 1}/{len(refs)}] step {ref.step}: {ref.spec} ({time.time() - t:.1f}s)")
    return EvolutionResult(s.to_json(), out, timeline(out))


def later_neurons(w: ModelWeights, s: EvolutionSettings, layer: int):
    """``(n_selected, top NeuronPoints, ContextNeurons)`` of the MLP of ``layer`` at one checkpoint, by the
    later-layer method (:mod:`attnscope.later.evaluate`), which GPT-NeoX/Pythia need: their layer-0 MLP reads the
    block's input, not layer-0 attention.  The ground truth is the true pre-activation of the MLP of ``layer`` on
    the very windows that method uses (its ``true_d_report``)."""
    res = find_later_neurons(w, layer, s.circuit, LaterSettings(eval=s.neuron.eval, max_windows=s.neuron.max_windows,
                                                                n_cards=max(s.top_k, 1)))
    rank = torch.empty(len(res.rows), dtype=torch.long)
    for r in res.rows:
        rank[r.index] = r.rank
    cards = {c.index: c for c in res.cards}
    top = []
    for r in res.rows[: s.top_k]:
        c = cards.get(r.index)
        toks = [t for t, _ in c.top_positive_tokens][:8] if c else []
        top.append(NeuronPoint(r.index, r.rank, float(r.sensitivity), c.label if c else None, toks))
    truth = res.true_d_report
    ctx = [_context_neuron(c, truth[c], rank, res.threshold.n_passed) for c in TRACKED_CONTEXTS if c in truth]
    return res.threshold.n_passed, top, ctx
