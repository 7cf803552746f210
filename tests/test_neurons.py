"""Context-sensitive neurons from weights: found, explained and verified (method §8-9)."""

from __future__ import annotations

import pytest

from attnscope.circuit import CircuitSettings, build_circuit
from attnscope.neurons import NeuronSettings, auto_label, find_neurons
from conftest import NEURON

CAL = "tests/data/moby.txt"


@pytest.fixture(scope="module")
def hand_result(context_neuron_gpt2):
    (w, _), ids = context_neuron_gpt2
    c = build_circuit(w, CircuitSettings(calibration=CAL, n_ctx=128))
    return w, ids, find_neurons(w, c, NeuronSettings(), progress=False)


def test_finds_the_hand_built_neuron(hand_result):
    w, ids, res = hand_result
    assert res.records and res.records[0].index == NEURON  # the top neuron is the one built by hand
    rec = res.records[0]
    top = {t for t, _ in rec.top_positive_tokens[: len(ids)]}
    assert top == set(w.tokenizer.convert_ids_to_tokens(ids))  # its evidence is exactly the token set
    assert rec.r > 0.9 and rec.fvu < 0.1  # verified against the true head contribution on held-out text
    assert rec.positive_text == "code_python" and rec.label == "Python code"
    assert rec.fired_on_calibration
    assert res.n_selected <= 5  # random neurons are not reported


def test_json_fields(hand_result):
    _, _, res = hand_result
    d = res.to_json()
    n = d["neurons"][0]
    for k in ("layer", "index", "score", "top_positive_tokens", "top_negative_tokens", "label", "r", "fvu",
              "fired_on_calibration"):
        assert k in n
    assert d["summary"]["n_neurons_found"] == res.n_selected


def test_real_model_minilm(minilm):
    w, _ = minilm
    c = build_circuit(w, CircuitSettings(calibration="bundled:en_moby_dick", n_ctx=128))
    res = find_neurons(w, c, NeuronSettings(max_neurons=16), progress=False)
    s = res.summary()
    assert 5 <= s["n_neurons_found"] <= 300 and s["median_r"] > 0.6


def test_auto_label():
    assert auto_label(["de", "la", "que", " el", "los", "para", "con", "x", "y"]) == "Spanish"
    assert auto_label([" self", "_", "(", "):", " def", " return", "x"]) == "Python code"
    assert auto_label([" realised", " organised", " programme", " colour", " centre", " whilst", "lads"]) \
        == "British/Commonwealth spelling"
    assert auto_label(["apple", "table", "green"]) is None
