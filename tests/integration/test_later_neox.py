"""Later-layer propagation on GPT-NeoX (issue 12: Pythia's neurons need the later-layer method): the linear map
``G_l`` from a deviation written after layer ``l``'s attention to the input of the MLP of ``L``, checked by
finite differences on transformers' own GPT-NeoX forward pass, with parallel and with sequential residuals."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import DATA, make_tiny_neox

from attnscope.core.errors import AttnscopeError
from attnscope.core.texts import load_windows
from attnscope.exact.decomposition import centre
from attnscope.later.effective import sample_activations
from attnscope.later.method import propagation
from attnscope.models import load_model


def _neox(path, tok_dir, parallel: bool):
    make_tiny_neox(path, tok_dir, parallel=parallel, n_layer=3, n_ctx=64, init_range=0.05, seed=1)
    return load_model(str(path), keep_hf=True)


@pytest.fixture(scope="module", params=[True, False], ids=["parallel", "sequential"])
def neox3(request, tiny_gpt2_dir, tmp_path_factory):
    return _neox(tmp_path_factory.mktemp("neox3"), tiny_gpt2_dir, request.param)


def _mlp_input_shift(hf, ids: torch.Tensor, l: int, L: int, delta: torch.Tensor) -> torch.Tensor:
    """Mean change over positions >= 1 of the MLP-of-L input (after its norm, so the prediction is
    ``centre(delta G_l) gamma / s_L``) when ``delta`` is added to
    layer ``l``'s attention output at every position: the model's own forward pass, with hooks."""
    seen = []
    grab = hf.gpt_neox.layers[L].mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    base = (hf(ids), seen.pop())[1]
    add = hf.gpt_neox.layers[l].attention.register_forward_hook(
        lambda m, a, out: (out[0] + delta,) + tuple(out[1:]))
    try:
        moved = (hf(ids), seen.pop())[1]
    finally:
        add.remove(), grab.remove()
    return (moved - base)[:, 1:].reshape(-1, delta.shape[0]).mean(0)


@torch.no_grad()
def test_propagation_matches_finite_differences(neox3):
    w, hf = neox3
    ids = load_windows(str(DATA / "moby.txt"), w.tokenizer, 64, 4, seed=0)[0]
    sa = sample_activations(w, ids, [0, 1, 2])
    G, _ = propagation(w, sa, 0, 2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        delta = torch.randn(w.d_model, generator=gen) * 0.05 * float(sa.attn_scale[1])
        got = _mlp_input_shift(hf, ids, 0, 2, delta)
        pred = centre(delta @ G, w) * w.ln2_w[2] / sa.mlp_scale[2]  # through the norm in front of the MLP of L
        cos = float(torch.nn.functional.cosine_similarity(got, pred, dim=0))
        ratio = float(pred.norm() / got.norm())
        if w.parallel_attn_mlp:  # measured: cos 0.998-0.999, norm ratio 1.00-1.02
            assert cos > 0.99 and 0.9 < ratio < 1.1, (cos, ratio)
        else:  # the MLP of l reads the deviation too (a second linearisation): cos 0.98-0.99, ratio 1.09-1.27
            assert cos > 0.95 and 0.75 < ratio < 1.4, (cos, ratio)
        if w.parallel_attn_mlp:  # the sequential formula would be measurably wrong on a parallel model
            from attnscope.later.method import attention_map, mlp_map

            I = torch.eye(w.d_model, dtype=torch.float64)
            seq = ((I + mlp_map(w, sa, 0)) @ (I + attention_map(w, sa, 1)) @ (I + mlp_map(w, sa, 1))
                   @ (I + attention_map(w, sa, 2))).float()
            wrong = centre(delta @ seq, w) * w.ln2_w[2] / sa.mlp_scale[2]
            assert float((wrong - got).norm()) > 2 * float((pred - got).norm())


def test_layer0_neurons_refused_on_parallel_models(tiny_gpt2_dir, tmp_path):
    from attnscope.neurons.find import find_neurons

    w, _ = _neox(tmp_path / "par", tiny_gpt2_dir, parallel=True)
    with pytest.raises(AttnscopeError, match="does not read layer-0 attention.*--layer 1"):
        find_neurons(w, None)  # refused before the circuit is read


@torch.no_grad()
def test_direct_path_is_exact_without_attention(neox3):
    """With every attention output a constant (``W_O = 0``, a random bias), the residual entering layer 2 is a
    function of the token alone:
    the direct-path fallback (each MLP applied to the token itself) must reproduce the forward pass, for the
    parallel block ``x + attn(ln1 x) + mlp(ln2 x)`` and the sequential one."""
    from dataclasses import replace

    from attnscope.exact.forward import iter_layers
    from attnscope.later.effective import direct_path

    w, _ = neox3
    b_O = torch.randn(w.b_O.shape, generator=torch.Generator().manual_seed(0)) * w.W_E.std()
    w0 = replace(w, W_O=torch.zeros_like(w.W_O), b_O=b_O)
    ids = load_windows(str(DATA / "moby.txt"), w.tokenizer, 64, 1, seed=0)[0]
    resid = next(a for a in iter_layers(w0, ids, stop_layer=2) if a.layer == 2).resid_pre[0]
    D = direct_path(w0, 2, {l: b_O[l] for l in range(2)})  # each attention output is exactly its mean
    torch.testing.assert_close(D[ids[0]], resid.float(), atol=1e-4, rtol=1e-4)
    assert (D[ids[0]] - w.W_E[ids[0]]).abs().max() > 1e-2  # the MLPs moved it: not a comparison of embeddings


def _neox_ckpt(path, tok_dir, step: int, seed: int):
    make_tiny_neox(path, tok_dir, d_mlp=128, init_range=0.1, seed=seed)
    (path / "training.json").write_text(json.dumps({"step": step, "tokens_seen": step * 64}))
    return path


def test_evolution_tracks_a_later_layer_on_parallel_models(tiny_gpt2_dir, tmp_path, monkeypatch):
    """Pythia-style series: the layer-0 neuron method does not apply, ``layer=1`` tracks the MLP of layer 1 by
    the later-layer method; the ground truth is checked against transformers' own forward pass (hooks)."""
    import attnscope.evolution.run as E
    from attnscope.circuit.build import CircuitSettings
    from attnscope.kernels.analysis import KernelSettings
    from attnscope.later.method import LaterSettings, sources
    from attnscope.neurons.find import NeuronSettings

    monkeypatch.setenv("ATTNSCOPE_CACHE", str(tmp_path / "cache"))
    for step, seed in ((0, 0), (10, 1)):
        _neox_ckpt(tmp_path / f"s{step}", tiny_gpt2_dir, step, seed)
    base = E.EvolutionSettings(kernel=KernelSettings(n_samples=2, n_heldout=1), circuit=CircuitSettings(window=32),
                               neuron=NeuronSettings(max_windows=2), top_k=3)
    zero = E.run_evolution([str(tmp_path / "s0")], base)
    assert zero.checkpoints[0].top_neurons == [] and "--layer 1" in zero.checkpoints[0].notes[0]
    res = E.run_evolution([str(tmp_path / "s0"), str(tmp_path / "s10")], replace(base, layer=1))
    c = res.checkpoints[1]
    assert c.notes == [] and [n.rank for n in c.top_neurons] == [1, 2, 3]
    assert all(a.effect >= b.effect for a, b in zip(c.top_neurons, c.top_neurons[1:]))
    w, hf = load_model(str(tmp_path / "s10"), keep_hf=True)
    wins = sources(w, base.circuit, LaterSettings(eval=None, max_windows=2), 128)
    pres = []
    for x in wins:  # the MLP of layer 1's pre-activation from the model's own forward pass
        got: list = []
        h = hf.gpt_neox.layers[1].mlp.dense_h_to_4h.register_forward_hook(
            lambda m, a, o, got=got: got.append(o.detach()))
        with torch.no_grad():
            hf(x.report)
        h.remove()
        pres.append(got[0][:, base.circuit.window // 4 :].reshape(-1, w.d_mlp).double())  # min_position
    names = [x.name for x in wins]
    for cn in c.context_neurons:
        k = names.index(cn.context)
        a, rest = pres[k], torch.cat([p for j, p in enumerate(pres) if j != k])
        d = (a.mean(0) - rest.mean(0)) / ((a.var(0, unbiased=False) + rest.var(0, unbiased=False)) / 2).sqrt()
        assert cn.index == int(d.argmax()) and cn.d == pytest.approx(float(d.max()), abs=1e-3)
        assert 1 <= cn.rank <= w.d_mlp
