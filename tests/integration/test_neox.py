"""GPT-NeoX (Pythia) adapter: partial rotary and parallel attention + MLP, recomputed exactly from the
weights of randomly initialised GPT-NeoX models built with transformers; ``hub-id@revision`` specs."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_neox

from attnscope.core.errors import ModelNotFoundError
from attnscope.exact.forward import compare_with_model, run
from attnscope.models import load_model, resolve
from attnscope.models.resolve import split_revision

TOL = 1e-4  # as tests/unit/test_forward.py


@pytest.fixture(scope="module", params=[True, False], ids=["parallel", "sequential"])
def neox(request, tiny_gpt2_dir, tmp_path_factory):
    path = make_tiny_neox(tmp_path_factory.mktemp("neox"), tiny_gpt2_dir, parallel=request.param)
    return load_model(str(path), keep_hf=True), request.param


def test_neox_weights_layout(neox):
    (w, hf), parallel = neox
    assert w.model_type == "gpt_neox" and w.positional == "rotary" and w.W_pos is None
    assert w.d_head == 16 and w.rotary_dim == 4  # rotary_pct 0.25 of the head dimension
    assert w.parallel_attn_mlp is parallel
    assert w.info().get("parallel_attn_mlp", False) is parallel
    # the fused query_key_value rows are [head, (q|k|v), d_head]: head 1's key is rows 1*48+16 .. 1*48+32
    qkv = hf.gpt_neox.layers[0].attention.query_key_value
    torch.testing.assert_close(w.W_K[0, 1], qkv.weight[48 + 16 : 48 + 32].T)
    torch.testing.assert_close(w.b_V[0, 2], qkv.bias[96 + 32 : 96 + 48])


def test_neox_exact_recompute(neox, moby_text):
    (w, hf), _ = neox
    ids = w.tokenizer(moby_text[:2000], return_tensors="pt")["input_ids"][:, : w.n_ctx]
    assert ids.shape[1] == w.n_ctx
    d = compare_with_model(w, hf, ids)
    assert len(d["pattern"]) == 2
    assert max(d["pattern"]) <= TOL, d
    for diff, scale in zip(d["mlp_pre"], d["mlp_pre_max_abs"]):
        assert diff <= TOL * max(1.0, scale / 10), d
    # the comparison can fail: patterns have structure, and getting the residual wiring or the rotary
    # width wrong moves the numbers far beyond the tolerance
    assert run(w, ids[:, :64])[0].pattern[0, :, 10:].max(-1).values.mean() > 0.2
    w.parallel_attn_mlp = not w.parallel_attn_mlp
    try:
        assert compare_with_model(w, hf, ids)["mlp_pre"][0] > 100 * TOL
    finally:
        w.parallel_attn_mlp = not w.parallel_attn_mlp
    w.rotary_dim = w.d_head
    try:
        assert max(compare_with_model(w, hf, ids)["pattern"]) > 100 * TOL
    finally:
        w.rotary_dim = 4


def test_split_revision(tmp_path):
    assert split_revision("EleutherAI/pythia-70m@step1000") == ("EleutherAI/pythia-70m", "step1000")
    assert split_revision("gpt2") == ("gpt2", None)
    at = tmp_path / "run@3"
    at.mkdir()
    assert split_revision(str(at)) == (str(at), None)  # an existing local path is never split
    r = resolve("EleutherAI/pythia-70m@step1000")
    assert (r.kind, r.path, r.revision) == ("hub", "EleutherAI/pythia-70m", "step1000")


@pytest.mark.parametrize("spec", ["EleutherAI/pythia-70m@", "@step1000", "a@b@c"])
def test_bad_revision_spec_is_one_line(spec):
    with pytest.raises(ModelNotFoundError, match="hub-id@revision") as e:
        resolve(spec)
    assert "\n" not in str(e.value)


def test_evolution_on_parallel_neox_reports_kernels_but_not_layer0_neurons(neox, tmp_path, monkeypatch):
    """With parallel attention + MLP the layer-0 neuron method does not apply: evolution says so and
    reports kernels, head criteria and the ground truth only."""
    import attnscope.evolution.run as E
    from attnscope.kernels.analysis import KernelSettings

    (w, _), parallel = neox
    monkeypatch.setenv("ATTNSCOPE_CACHE", str(tmp_path))
    from attnscope.neurons.find import NeuronSettings

    s = E.EvolutionSettings(kernel=KernelSettings(n_samples=2, n_heldout=1), neuron=NeuronSettings(max_windows=2),
                            top_k=3)
    c = E.summarise_checkpoint(E.CheckpointRef(w.name, 0), s)
    assert len(c.heads) == w.n_layers * w.n_heads and len(c.head_criteria) == w.n_heads
    assert (E.PARALLEL_NOTE in c.notes) is parallel
    if parallel:
        assert c.top_neurons == [] and all(x.rank is None for x in c.context_neurons)
