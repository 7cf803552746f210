"""The linear context probe separates what the hand-built context neuron encodes."""

from __future__ import annotations

from attnscope.neurons.probe import context_probe


def test_probe_separates_code_from_prose(context_neuron_gpt2):
    (w, _), _ = context_neuron_gpt2
    r = context_probe(w, texts=["bundled:code_python", "bundled:en_moby_dick"], n_ctx=128, stride=4, epochs=50)
    assert r.contexts == ["code_python", "en_moby_dick"]
    assert r.recall["code_python"] > 0.8 and "code_python" in r.separated
    assert sum(map(sum, r.confusion)) > 100 and r.chance == 0.5
