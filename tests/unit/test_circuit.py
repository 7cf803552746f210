"""Contextual heads, denominators and the linear summary (method §6-7)."""

from __future__ import annotations

import pytest
import torch

from attnscope.circuit.build import (
    CircuitSettings,
    build_circuit,
    circuit_fidelity,
    denominator_stability,
    true_head_output,
)
from attnscope.core.errors import ConditionFailedError, IndexOutOfRangeError, NoContextualHeadsError, TextTooShortError
from attnscope.core.texts import text_tokens

CAL = "tests/data/moby.txt"


@pytest.fixture(scope="module")
def hand_circuit(context_neuron_gpt2):
    (w, _), _ = context_neuron_gpt2
    return w, build_circuit(w, CircuitSettings(calibration=CAL, n_ctx=128))


def test_detects_the_contextual_head(hand_circuit):
    _, c = hand_circuit
    assert c.heads == [0]
    d0 = c.decisions[0]
    assert d0.chosen and d0.n_eff > 60 and d0.logit_std < 1e-6 and d0.denominator_cv < 1e-6
    for d in c.decisions[1:]:
        assert not d.chosen and any(">" in r or "<" in r for r in d.reasons)
    assert all(cond.ok for cond in c.conditions if cond.name in ("broad kernel", "stable denominators"))


def test_summary_matches_true_head_output(hand_circuit):
    w, c = hand_circuit
    toks = text_tokens("bundled:code_python", w.tokenizer, max_tokens=128)
    moby = text_tokens("bundled:en_moby_dick", w.tokenizer, max_tokens=128)
    fid = circuit_fidelity(w, c, {"code": toks, "moby": moby})
    assert fid["fvu"] < 0.01 and fid["median_r_per_dimension"] > 0.99
    y, _, _ = true_head_output(w, c.heads, toks)
    assert y.shape == (128, w.d_model)


def test_kernel_rows_normalised_and_causal(hand_circuit):
    _, c = hand_circuit
    torch.testing.assert_close(c.kernel.sum(-1), torch.ones(c.T), atol=1e-5, rtol=0)
    assert c.kernel.triu(1).abs().max() == 0


def test_denominators_reported_per_text(hand_circuit):
    w, c = hand_circuit
    texts = {"es": text_tokens("bundled:es_fortunes", w.tokenizer, max_tokens=128)}
    den = denominator_stability(w, c, texts)
    # head 0 is content-blind: its denominator is the same on any text
    assert abs(den["es"]["ratio_to_calibration"][0] - 1.0) < 1e-5


def test_real_models_report_conditions(minilm, smollm2):
    w, _ = minilm
    c = build_circuit(w, CircuitSettings(calibration="bundled:en_moby_dick", n_ctx=128))
    assert len(c.heads) >= 2 and all(isinstance(x.ok, bool) for x in c.conditions)
    # rotary model: heads are taken only where the measured conditions hold; the others say which failed
    w2, _ = smollm2
    c2 = build_circuit(w2, CircuitSettings(calibration="bundled:en_moby_dick", n_ctx=128))
    for d in c2.decisions:
        assert d.chosen == (d.n_eff >= 16 and d.logit_std <= 1 and d.decomposition_tv <= 0.2
                            and d.denominator_cv <= 0.15 and d.share_tv <= 0.3)
    assert any(not d.chosen and "decomposition TV" in " ".join(d.reasons) for d in c2.decisions)
    # a stricter split requirement leaves no head, and the error names the failing measurement
    with pytest.raises(ConditionFailedError, match=r"no contextual heads in layer 0 .*decomposition TV=\d") as err:
        build_circuit(w2, CircuitSettings(calibration="bundled:en_moby_dick", n_ctx=128, decomposition_tv_max=0.01))
    # typed: the closest head and its failed criteria, each with its measurement (no parsing of the message)
    e = err.value
    assert isinstance(e, NoContextualHeadsError) and 0 <= e.closest_head < w2.n_heads
    assert e.reasons and e.limiting == f"head {e.closest_head}: {'; '.join(e.reasons)}" and e.limiting in str(e)


def test_errors(tiny_gpt2, tmp_path):
    w, _ = tiny_gpt2
    short = tmp_path / "short.txt"
    short.write_text("Call me Ishmael. Some years ago.")
    with pytest.raises(TextTooShortError, match="at least 101"):
        build_circuit(w, CircuitSettings(calibration=str(short)))
    with pytest.raises(IndexOutOfRangeError, match="head index 9"):
        build_circuit(w, CircuitSettings(calibration=CAL, heads=[9], n_ctx=128))


def test_circuit_save_load_round_trip(hand_circuit, tmp_path):
    import json

    from attnscope.circuit.build import Circuit, Criterion

    w, c = hand_circuit
    c.save(tmp_path / "circ")
    back = Circuit.load(tmp_path / "circ")
    assert back.to_json() == json.loads(json.dumps(c.to_json()))
    for name in ("kernel", "head_kernels", "f", "Z", "ext", "positional", "calibration_tokens", "token_mask"):
        a, b = getattr(c, name), getattr(back, name)
        assert a.dtype == b.dtype and torch.equal(a.cpu(), b), name
    assert back.decisions == c.decisions and back.conditions == c.conditions
    assert all(isinstance(x, Criterion) for d in back.decisions for x in d.failed)
    toks = text_tokens("bundled:en_moby_dick", w.tokenizer, max_tokens=64).to(w.device)
    assert torch.equal(back.summary(toks.cpu()), c.summary(toks).cpu())
    # a file from another schema version is refused with a clear error
    d = json.loads((tmp_path / "circ" / "circuit.json").read_text())
    (tmp_path / "circ" / "circuit.json").write_text(json.dumps({**d, "schema_version": 99}))
    from attnscope.core.errors import AttnscopeError

    with pytest.raises(AttnscopeError, match="schema version 99"):
        Circuit.load(tmp_path / "circ")


def test_conditions_carry_their_group_and_heads_their_failed_criteria(hand_circuit):
    from attnscope.circuit.build import HEAD_CRITERIA, Criterion

    _, c = hand_circuit
    assert {x.name: x.group for x in c.conditions} == {
        "broad kernel": "denom", "weak content dependence": "denom", "stable denominators": "denom",
        "no outlier tokens": "denom", "shared kernel": "summary", "content/position split": "split",
        "constant MLP-norm scale": "neuron", "constant sink mass": "summary", "summary fidelity": "summary"}
    assert all(x.ok == ((x.measured >= x.threshold) if x.criterion is Criterion.BROAD else (x.measured <= x.threshold))
               for x in c.conditions)
    s = CircuitSettings()
    for d in c.decisions:
        expected = {Criterion.BROAD: d.n_eff < s.neff_min, Criterion.WEAK: d.logit_std > s.logit_std_max,
                    Criterion.SPLIT: d.decomposition_tv > s.decomposition_tv_max,
                    Criterion.STABLE: d.denominator_cv > s.denominator_cv_max,
                    Criterion.SHARED: d.share_tv > s.share_tv_max}
        assert set(d.failed) == {k for k, bad in expected.items() if bad}, d
        assert d.chosen == (not d.failed)  # detection: chosen exactly when every test passes
        assert [k for k, _, _ in d.checks()] == list(HEAD_CRITERIA)
        assert all(met == (k not in d.failed) for k, _, met in d.checks())
    assert any(d.failed for d in c.decisions)  # the hand-built model has non-contextual heads


def test_forced_heads_record_the_user_choice(context_neuron_gpt2):
    from attnscope.circuit.build import Criterion

    (w, _), _ = context_neuron_gpt2
    c = build_circuit(w, CircuitSettings(calibration=CAL, n_ctx=128, heads=[0, 1]))
    assert c.heads == [0, 1]
    for d in c.decisions:
        assert (Criterion.USER in d.failed) == (d.head not in (0, 1))
        assert d.checks()[-1][0] is Criterion.USER and d.checks()[-1][1] in ("chosen by the user", "not in --heads")
