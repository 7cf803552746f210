"""The formation timeline of a checkpoint series: when each layer-0 head leaves "uniform", when each criterion and
condition first passes (and holds from), each tracked context neuron's effect size and rank over the steps, and
which top neurons persist between consecutive checkpoints.  Typed (:class:`Timeline`), saved in evolution.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from attnscope.circuit.result import HEAD_CRITERIA
from attnscope.core.serialize import from_dict
from attnscope.neurons.result import D_MIN

if TYPE_CHECKING:
    from attnscope.evolution.run import CheckpointSummary, NeuronPoint

#: contexts whose neurons the timeline follows (bundled text names)
TRACKED_CONTEXTS = ("es_fortunes", "de_fortunes", "code_python")
CRITERIA = tuple(c.value for c in HEAD_CRITERIA)  # the per-head detection criteria
Step = int | None  # a checkpoint's step; None: never (or not recorded)


@dataclass
class HeadFormation:
    """One layer-0 head's kernel category over the steps."""

    categories: list[str | None]
    first_uniform_step: Step
    leaves_uniform_step: Step  # first step after a uniform one at which it is no longer uniform
    final_category: str | None


@dataclass
class ContextTimeline:
    """The strongest true neuron of one tracked context at every step."""

    index: list[int | None]
    d: list[float | None]  # its one-vs-rest effect size (true pre-activations)
    rank: list[int | None]  # its rank by the method's predicted sensitivity
    selected: list[bool]  # the method reports it
    first_true_step: Step  # first step with d >= D_MIN
    first_found_step: Step  # ... and reported by the method
    found_from_step: Step  # from which it stays found to the last checkpoint


@dataclass
class TokenMatch:
    """An appeared top neuron whose top tokens overlap a disappeared one's: the same feature, another index."""

    appeared: int
    disappeared: int
    overlap: float  # Jaccard overlap of their top tokens


@dataclass
class Persistence:
    """Top neurons between two consecutive checkpoints."""

    from_step: Step
    to_step: Step
    kept: list[int]
    appeared: list[int]
    disappeared: list[int]
    token_overlap_kept: float | None  # mean Jaccard overlap of a kept neuron's top tokens
    matched_by_tokens: list[TokenMatch]


@dataclass
class Timeline:
    steps: list[Step]
    heldout_loss: list[float | None]
    contextual_heads: list[list[int]]
    layer0_heads: dict[str, HeadFormation]  # head index (as a string, a JSON key) -> formation
    conditions_first_pass: dict[str, Step]
    all_conditions_first_pass: Step
    all_conditions_hold_from: Step
    conditions_hold_from: dict[str, Step]
    never_passing_conditions: list[str]
    all_but_never_passing_first_pass: Step
    criteria_first_pass: dict[str, dict[str, Step]]  # head -> criterion (and "chosen") -> first step passing
    context_neurons: dict[str, ContextTimeline]
    neuron_persistence: list[Persistence]
    n_neurons_selected: list[int]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Timeline:
        return from_dict(cls, d)


def _first(steps: list, flags: list[bool]):
    return next((s for s, f in zip(steps, flags) if f), None)


def _holds_from(steps: list, flags: list[bool]):
    """First step from which ``flags`` stays true to the last checkpoint (None if false at the last)."""
    i = len(flags)
    while i > 0 and flags[i - 1]:
        i -= 1
    return steps[i] if i < len(flags) else None


def _persistence(cks: list[CheckpointSummary]) -> list[Persistence]:
    """Top neurons between consecutive checkpoints: kept (same index), appeared, disappeared, and how much
    the token evidence of a kept neuron changed (Jaccard overlap of its top tokens)."""
    out = []
    for a, b in zip(cks, cks[1:]):
        ia, ib = {n.index: n for n in a.top_neurons}, {n.index: n for n in b.top_neurons}
        kept = sorted(set(ia) & set(ib))
        jac = [_jaccard(ia[k].top_tokens, ib[k].top_tokens) for k in kept if ia[k].top_tokens and ib[k].top_tokens]
        new, gone = sorted(set(ib) - set(ia)), sorted(set(ia) - set(ib))
        out.append(Persistence(a.step, b.step, kept, new, gone, sum(jac) / len(jac) if jac else None,
                               _token_matches([ib[k] for k in new], [ia[k] for k in gone])))
    return out


def _jaccard(a: list[str], b: list[str]) -> float:
    return len(set(a) & set(b)) / max(1, len(set(a) | set(b)))


def _token_matches(new: list[NeuronPoint], gone: list[NeuronPoint], min_overlap: float = 0.3) -> list[TokenMatch]:
    """An appeared neuron whose top tokens overlap a disappeared one's (Jaccard >= ``min_overlap``): the same
    feature under another index."""
    out = []
    for n in new:
        best = max(gone, key=lambda g: _jaccard(n.top_tokens, g.top_tokens), default=None)
        if best is not None and n.top_tokens and _jaccard(n.top_tokens, best.top_tokens) >= min_overlap:
            out.append(TokenMatch(n.index, best.index, _jaccard(n.top_tokens, best.top_tokens)))
    return out


def timeline(cks: list[CheckpointSummary]) -> Timeline:
    """The formation timeline: when each layer-0 head leaves "uniform", when each criterion/condition first
    passes, and each tracked context neuron's effect size and rank over the steps."""
    steps = [c.step for c in cks]
    heads0 = sorted({h.head for c in cks for h in c.heads if h.layer == 0})
    leaves = {}
    for h in heads0:
        cats = [next((x.category for x in c.heads if x.layer == 0 and x.head == h), None) for c in cks]
        was = [i for i, cat in enumerate(cats) if cat == "uniform"]
        after = [i for i, cat in enumerate(cats) if cat != "uniform" and was and i > was[0]]
        leaves[str(h)] = HeadFormation(cats, steps[was[0]] if was else None, steps[after[0]] if after else None,
                                       cats[-1])
    names = [c.name for c in cks[-1].conditions] if cks and cks[-1].conditions else []
    passes = {n: [any(x.name == n and x.ok for x in c.conditions) for c in cks] for n in names}
    conds = {n: _first(steps, f) for n, f in passes.items()}
    all_ok = [bool(c.conditions) and all(x.ok for x in c.conditions) for c in cks]
    never = [n for n, s in conds.items() if s is None]
    all_but_never = [bool(c.conditions) and all(x.ok for x in c.conditions if x.name not in never) for c in cks]
    ctx = {}
    for name in TRACKED_CONTEXTS:
        pts = [next((x for x in c.context_neurons if x.context == name), None) for c in cks]
        found = [bool(p and p.d >= D_MIN and p.selected) for p in pts]
        ctx[name] = ContextTimeline([p.index if p else None for p in pts], [p.d if p else None for p in pts],
                                    [p.rank if p else None for p in pts], [bool(p and p.selected) for p in pts],
                                    _first(steps, [bool(p and p.d >= D_MIN) for p in pts]), _first(steps, found),
                                    _holds_from(steps, found))
    return Timeline(steps, [c.heldout_loss for c in cks], [c.contextual_heads for c in cks], leaves, conds,
                    _first(steps, all_ok), _holds_from(steps, all_ok),
                    {n: _holds_from(steps, f) for n, f in passes.items()}, never, _first(steps, all_but_never),
                    _criteria_first_pass(cks, steps), ctx, _persistence(cks), [c.n_neurons_selected for c in cks])


def _criteria_first_pass(cks: list[CheckpointSummary], steps: list) -> dict[str, dict[str, Step]]:
    heads = sorted({h.head for c in cks for h in c.head_criteria})
    out: dict[str, dict[str, Step]] = {}
    for h in heads:
        per = [next((x for x in c.head_criteria if x.head == h), None) for c in cks]
        out[str(h)] = {k: _first(steps, [bool(p and p.criteria.get(k)) for p in per]) for k in CRITERIA}
        out[str(h)]["chosen"] = _first(steps, [bool(p and p.chosen) for p in per])
    return out
