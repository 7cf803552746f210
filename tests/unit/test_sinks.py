"""Rotary separable split and attention sinks (issue 10): exactness where it must be exact, real numbers."""

from __future__ import annotations

import pytest
import torch

from attnscope.exact.decomposition import (
    apply_pair_weights,
    pair_weights_from_profile,
    pre_rotation,
    rotary_frequencies,
    rotary_score_parts,
    separable_rotary_score_parts,
)
from attnscope.exact.forward import run


@pytest.fixture(scope="session")
def tiny_llama(tiny_gpt2_dir, tmp_path_factory):
    """A random Llama-architecture model (rotary, RMSNorm, GQA) with the tiny GPT-2's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from attnscope.models import load_model

    path = tmp_path_factory.mktemp("tiny_llama")
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=1000.0,
                      bos_token_id=0, eos_token_id=0, initializer_range=0.2)
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return load_model(str(path), keep_hf=True)


def _ids(w, text: str, T: int) -> torch.Tensor:
    return w.tokenizer(text, return_tensors="pt")["input_ids"][:, :T]


def test_pair_weights_of_one_offset_is_the_rotation(tiny_llama):
    w, _ = tiny_llama
    prof = torch.zeros(40, dtype=torch.float64)
    prof[7] = 3.0
    c = pair_weights_from_profile(w, prof)
    theta = rotary_frequencies(w)
    torch.testing.assert_close(c, torch.polar(torch.ones_like(theta), 7 * theta))
    # a uniform profile damps fast pairs to |c| ~ 0 and keeps the slowest near 1
    cu = pair_weights_from_profile(w, torch.ones(40, dtype=torch.float64)).abs()
    assert cu[0] < 0.1 and cu[-1] > 0.9


def test_per_row_pair_weights_are_the_closed_form_over_each_rows_offsets(tiny_llama):
    """Row n of the per-row weights is the closed form of the profile cut to the offsets that exist at n (the
    sink's offset left out); the last row is the whole-profile weights."""
    from attnscope.exact.decomposition import pair_weights_of_kernel

    w, _ = tiny_llama
    T = 30
    rows = torch.softmax(torch.randn(w.n_heads, T, generator=torch.Generator().manual_seed(1), dtype=torch.float64), -1)
    c = pair_weights_of_kernel(w, rows, True, per_row=True)
    assert c.shape == (w.n_heads, T, len(rotary_frequencies(w)))
    prof = rows.clone()
    prof[:, 0] = 0
    prof = prof.flip(-1)  # offset d = T - 1 - i
    for n in (1, 7, T - 1):
        torch.testing.assert_close(c[:, n], pair_weights_from_profile(w, prof[:, :n]))
    torch.testing.assert_close(c[:, -1], pair_weights_of_kernel(w, rows, True))
    # applied per row: row n of x is weighted by c[:, n]
    x = torch.randn(1, w.n_heads, 5, w.d_head, dtype=torch.float64)
    got = apply_pair_weights(w, x, c)
    for n in range(5):
        torch.testing.assert_close(got[:, :, n : n + 1], apply_pair_weights(w, x[:, :, n : n + 1], c[:, n]))


def test_separable_split_exact_at_its_offset(tiny_llama, moby_text):
    """With c_j = e^{i d theta_j} the separable split reproduces the exact score at offset d (and c = 1 gives
    today's zero-offset split), measured against the forward pass's rotated q . k."""
    w, _ = tiny_llama
    ids = _ids(w, moby_text[:2000], 48)
    a = run(w, ids, stop_layer=0)[0]
    q, k = pre_rotation(w, a.q), pre_rotation(w, a.k)
    k_static = k[0].mean(1, keepdim=True).expand(-1, k.shape[2], -1)
    exact = torch.einsum("bhne,bhie->bhni", a.q, a.k)
    theta = rotary_frequencies(w)
    for d in (0, 1, 5, 20):
        c = torch.polar(torch.ones_like(theta), d * theta)[None].expand(w.n_heads, -1)
        cont, pos = separable_rotary_score_parts(w, q, k, k_static, c)
        got = (cont + pos).diagonal(offset=-d, dim1=-2, dim2=-1)
        torch.testing.assert_close(got, exact.diagonal(offset=-d, dim1=-2, dim2=-1), atol=1e-4, rtol=1e-4)
        # other offsets are not exact (the split is an approximation there)
        other = (cont + pos - exact).diagonal(offset=-(d + 3), dim1=-2, dim2=-1)
        assert other.abs().max() > 1e-2
    ones = torch.ones(w.n_heads, len(theta), dtype=torch.complex128)
    cont1, pos1 = separable_rotary_score_parts(w, q, k, k_static, ones)
    cont0, pos0 = rotary_score_parts(w, 0, a.attn_in, k_static)
    torch.testing.assert_close(cont1 + pos1, cont0 + pos0, atol=1e-4, rtol=1e-4)


def test_pair_weights_are_least_squares(tiny_llama, moby_text):
    """c_j = sum_d w(d) e^{i d theta_j} minimises the w-weighted squared error of the content score over offsets:
    the error is larger for any perturbed c (checked against brute force over every offset)."""
    w, _ = tiny_llama
    ids = _ids(w, moby_text[:2000], 48)
    a = run(w, ids, stop_layer=0)[0]
    q, k = pre_rotation(w, a.q)[0, :, -1], pre_rotation(w, a.k)[0]  # one query [h, e], keys [h, i, e]
    dk = k - k.mean(1, keepdim=True)
    theta = rotary_frequencies(w)
    D = 30
    prof = torch.exp(-torch.arange(D, dtype=torch.float64) / 6.0)
    wts = prof / prof.sum()

    def err(c: torch.Tensor) -> float:
        tot = 0.0
        for d in range(D):
            rot = torch.polar(torch.ones_like(theta), d * theta)[None].expand(w.n_heads, -1)
            true = torch.einsum("he,hie->hi", apply_pair_weights(w, q[:, None], rot)[:, 0], dk)
            sep = torch.einsum("he,hie->hi", apply_pair_weights(w, q[:, None], c)[:, 0], dk)
            tot += float(wts[d] * ((true - sep) ** 2).sum())
        return tot

    c = pair_weights_from_profile(w, prof)[None].expand(w.n_heads, -1)
    best = err(c)
    assert best < err(torch.ones_like(c)) * 0.9  # better than the zero-offset split
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        noise = 0.05 * torch.complex(torch.randn(c.shape, generator=gen, dtype=torch.float64),
                                     torch.randn(c.shape, generator=gen, dtype=torch.float64))
        assert err(c + noise) > best


def test_bos_choice_recorded_and_sink_excluded_kernels_agree(tmp_path):
    """GPT-2 architecture: the BOS choice is the caller's and is recorded; the sink-excluded kernels (first
    position dropped, renormalised) with and without BOS agree within TV 0.05 in every layer."""
    from conftest import make_positional_gpt2

    from attnscope.exact.decomposition import tv_distance
    from attnscope.exact.sinks import split_sink
    from attnscope.kernels.analysis import KernelSettings, analyse_kernels
    from attnscope.models import load_model

    path = make_positional_gpt2(tmp_path / "m")
    res = {}
    for bos in (False, True):
        w = load_model(str(path), prepend_bos=bos)
        assert w.info()["prepend_bos"] is bos and w.bos_token_id == 0  # a local GPT-2 keeps no-BOS unless asked
        res[bos] = analyse_kernels(w, KernelSettings(n_ctx=48, n_samples=8, n_heldout=2), cache=False, progress=False)
        assert res[bos].provenance["bos"] == (0 if bos else None)
    assert load_model(str(path)).prepend_bos is False
    for key in ("data_kernel", "mean_attention"):
        a = split_sink(res[False].arrays[key].double())[1]
        b = split_sink(res[True].arrays[key].double())[1]
        assert float(tv_distance(a, b).max()) < 0.05


def test_kernel_sink_mass_matches_output_attentions(tiny_llama):
    """Every head's sink_mass / sink_mass_cv equal the statistics of the model's own output_attentions on the
    held-out windows; the category comes from the kernel without the first position."""
    from attnscope.core.texts import load_windows
    from attnscope.kernels.analysis import KernelSettings, _samples_spec, analyse_kernels

    w, hf = tiny_llama
    assert w.analysis_bos == 0
    s = KernelSettings(n_ctx=40, n_samples=4, n_heldout=3, samples="bundled:en_moby_dick")
    r = analyse_kernels(w, s, cache=False, progress=False)
    win, _ = load_windows(_samples_spec(s.samples), w.tokenizer, 40, 7, seed=0, bos_token_id=0)
    assert (win[:, 0] == 0).all()
    with torch.no_grad():
        att = hf(win[4:], output_attentions=True).attentions  # per layer [b, h, n, i]
    n0 = r.query_positions[0]
    for rec in r.records:
        s0 = att[rec.layer][:, rec.head, n0:, 0].permute(1, 0).reshape(-1).double()
        assert abs(rec.sink_mass - float(s0.median())) < 1e-5
        assert abs(rec.sink_mass_cv - float(s0.std() / s0.mean())) < 1e-4
        assert rec.category != "first-token sink" and rec.sink_dominated == (rec.sink_mass >= 0.5)
    # the category figure writes each head's sink mass (>= 0.05) in its cell and hatches sink-dominated heads
    import matplotlib.pyplot as plt

    from attnscope.report.plots import _grid, _sink_marks

    r.record(1, 2).sink_mass, r.record(0, 1).sink_mass = 0.71, 0.12  # this tiny model's own masses are < 0.05
    fig, ax = plt.subplots()
    marks = _sink_marks(ax, r, *_grid(r))
    plt.close(fig)
    assert marks == [(x.layer, x.head, f"{x.sink_mass:.2f}", x.sink_mass >= 0.5)
                     for x in sorted(r.records, key=lambda x: (x.layer, x.head)) if x.sink_mass >= 0.05]
    assert (0, 1, "0.12", False) in marks and (1, 2, "0.71", True) in marks
    assert r.provenance["prepend_bos"] is True and "sink_handling" in r.provenance


@pytest.fixture(scope="module")
def bos_circuit(tmp_path_factory):
    """The hand-built context-neuron GPT-2 (head 0: zero query, uniform) analysed WITH a BOS in front."""
    from conftest import make_context_neuron_gpt2

    from attnscope.circuit.build import CircuitSettings, build_circuit
    from attnscope.models import load_model

    path, _ = make_context_neuron_gpt2(tmp_path_factory.mktemp("cn_bos"))
    w, hf = load_model(str(path), keep_hf=True, prepend_bos=True)
    return w, hf, build_circuit(w, CircuitSettings(calibration="tests/data/moby.txt", n_ctx=128))


def test_circuit_splits_off_the_sink(bos_circuit):
    """Head 0 attends uniformly, so its sink mass is 1 / (n + 1) at query n: the decision reports exactly that
    (checked against output_attentions), the kernel the circuit uses has no mass on the BOS, and the BOS choice
    is recorded."""
    w, hf, c = bos_circuit
    assert c.heads == [0] and c.settings.bos == 0 and c.settings.prepend_bos is True
    n_min, T = c.settings.min_position, c.T
    n = torch.arange(n_min, T, dtype=torch.float64)
    d0 = c.decisions[0]
    assert abs(d0.sink_mass - float((1 / (n + 1)).median())) < 1e-5
    assert abs(d0.sink_mass_cv - float((1 / (n + 1)).std() / (1 / (n + 1)).mean())) < 1e-4
    with torch.no_grad():
        att = hf(c.calibration_tokens[None], output_attentions=True).attentions[0][0]
    assert abs(d0.sink_mass - float(att[0, n_min:, 0].median())) < 1e-5
    assert c.kernel[1:, 0].abs().max() == 0
    torch.testing.assert_close(c.kernel[1:].sum(-1), torch.ones(T - 1), atol=1e-5, rtol=0)
    # the kernel without the sink of a uniform head is uniform over positions 1..n
    torch.testing.assert_close(c.kernel[-1, 1:], torch.full((T - 1,), 1.0 / (T - 1)), atol=1e-5, rtol=0)
    assert c.condition("constant sink mass").measured == 0.0  # sink 0.03 < 0.05: no constant-sink claim made


def test_circuit_with_sink_and_query_conditioned_variant_match_truth(bos_circuit):
    import dataclasses

    from attnscope.circuit.build import circuit_fidelity
    from attnscope.circuit.query import choose_query_form
    from attnscope.core.texts import text_tokens

    w, _, c = bos_circuit
    on = choose_query_form(w, dataclasses.replace(c, settings=dataclasses.replace(c.settings, query_conditioned="on"),
                                                  conditions=list(c.conditions)))
    texts = {s: text_tokens(f"bundled:{s}", w.tokenizer, max_tokens=128, bos_token_id=0)
             for s in ("code_python", "es_fortunes")}
    typ = circuit_fidelity(w, c, texts)
    qc = circuit_fidelity(w, on, texts)
    # head 0 is content-blind (f = 1 for every query), so both forms equal the true output up to the constant sink
    assert not c.query_conditioned and on.query_conditioned
    assert typ["fvu"] < 0.02 and abs(qc["fvu"] - typ["fvu"]) < 0.005
