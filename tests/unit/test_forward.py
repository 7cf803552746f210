"""The exact recomputation equals the model's own numbers on every head of every layer (issue: foundation)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from attnscope.core.texts import text_tokens
from attnscope.exact.forward import compare_with_model, run

TOL = 1e-4


def _assert_exact(weights, hf, tokens):
    diffs = compare_with_model(weights, hf, tokens)
    assert len(diffs["pattern"]) == weights.n_layers
    assert max(diffs["pattern"]) <= TOL, diffs  # every head of every layer
    assert diffs["mlp_pre"][0] <= TOL, diffs  # layer-0 MLP pre-activations, absolute
    # deeper layers: float32 rounding grows with the residual's size (SmolLM2 reaches |x| ~ 1e3)
    for d, scale in zip(diffs["mlp_pre"], diffs["mlp_pre_max_abs"]):
        assert d <= TOL * max(1.0, scale / 10), diffs
    return diffs


def test_tiny_gpt2_exact(tiny_gpt2, moby_text):
    w, hf = tiny_gpt2
    ids = w.tokenizer(moby_text[:2000], return_tensors="pt")["input_ids"][:, : w.n_ctx]
    assert ids.shape[1] == w.n_ctx  # fills the whole context
    _assert_exact(w, hf, ids)


def test_tiny_gpt2_patterns_are_sharp_and_causal(tiny_gpt2, moby_text):
    # a comparison of near-uniform patterns could not fail: check the test model has structure
    w, _ = tiny_gpt2
    ids = w.tokenizer(moby_text[:500], return_tensors="pt")["input_ids"][:, :64]
    acts = run(w, ids)
    p = acts[0].pattern[0]
    assert torch.allclose(p.sum(-1), torch.ones_like(p.sum(-1)), atol=1e-5)
    assert p.triu(1).abs().max() == 0
    assert p[:, 10:].max(-1).values.mean() > 0.2


def test_smollm2_exact(smollm2):
    w, hf = smollm2
    ids = text_tokens("tests/data/moby.txt", w.tokenizer, max_tokens=96, bos_token_id=w.bos_token_id)[None]
    d = _assert_exact(w, hf, ids)
    assert w.positional == "rotary" and w.n_kv_heads == 3 and w.n_heads == 9
    assert len(d["pattern"]) == 30


def test_minilm_exact(minilm):
    w, hf = minilm
    ids = w.tokenizer((open("tests/data/moby.txt").read())[:1500], return_tensors="pt", truncation=True,
                      max_length=128)["input_ids"]
    d = _assert_exact(w, hf, ids)
    assert not w.causal and len(d["pattern"]) == 6
    # bidirectional: a query attends to later keys
    p = run(w, ids, stop_layer=0)[0].pattern
    assert p.triu(1).sum() > 1.0


def test_demo_exact(demo):
    w, hf = demo
    ids = text_tokens("tests/data/moby.txt", w.tokenizer, max_tokens=w.n_ctx)[None]
    _assert_exact(w, hf, ids)


def test_stop_layer_streams(tiny_gpt2, moby_text):
    w, _ = tiny_gpt2
    ids = w.tokenizer(moby_text[:300], return_tensors="pt")["input_ids"][:, :100]
    assert len(run(w, ids, stop_layer=0)) == 1
    full = run(w, ids)
    part = run(w, ids, stop_layer=1)
    torch.testing.assert_close(full[1].pattern, part[1].pattern)


@pytest.mark.skipif(importlib.util.find_spec("transformer_lens") is None, reason="TransformerLens not installed")
def test_against_transformer_lens(tiny_gpt2_dir, tiny_gpt2, moby_text):
    """Independent reference: TransformerLens (HookedTransformer numerics) on the same GPT-2 weights."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import GPT2LMHeadModel

    w, _ = tiny_gpt2
    hf = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir, attn_implementation="eager").eval()  # the bridge wraps it
    bridge = TransformerBridge.boot_transformers(str(tiny_gpt2_dir), hf_model=hf)
    bridge.enable_compatibility_mode()  # folds LayerNorm and centres weights, as HookedTransformer did
    ids = w.tokenizer(moby_text[:1500], return_tensors="pt")["input_ids"][:, :100]
    _, cache = bridge.run_with_cache(ids)
    ours = run(w, ids)
    for l in range(w.n_layers):
        tl_pattern = cache[f"blocks.{l}.attn.hook_pattern"]
        assert (ours[l].pattern - tl_pattern).abs().max().item() <= TOL
        assert (ours[l].mlp_pre - cache[f"blocks.{l}.mlp.hook_pre"]).abs().max().item() <= TOL


def test_shared_mask_scores_and_static_positions(tiny_gpt2):
    from attnscope.exact.forward import causal_mask, mask_scores, qk_scores, static_positions

    w, _ = tiny_gpt2
    assert torch.equal(causal_mask(3, 5), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]).bool())
    qpos = torch.tensor([0, 2])
    assert torch.equal(causal_mask(2, 4, query_positions=qpos), torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0]]).bool())
    s = mask_scores(w, torch.zeros(2, 4), qpos)
    assert torch.isinf(s).sum() == 4 and s[1, 2] == 0
    q, k = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 6, 4)
    assert torch.allclose(qk_scores(q, k), q @ k.transpose(-1, -2), atol=1e-6)
    assert torch.allclose(qk_scores(q, k[0]), q @ k[0].transpose(-1, -2), atol=1e-6)
    assert torch.allclose(static_positions(w, 7), w.W_pos[:7], atol=1e-6)
    assert w.analysis_bos == (w.bos_token_id if w.prepend_bos else None)


def test_shapes_are_checked_at_run_time():
    """The jaxtyping annotations are enforced in the test suite (pyproject: --jaxtyping-packages): torch would
    broadcast a single-position cos/sin over every position; the shape check refuses it."""
    from jaxtyping import TypeCheckError

    from attnscope.exact.forward import apply_rotary

    x, cos = torch.randn(2, 5, 8), torch.ones(1, 8)
    assert apply_rotary(x, cos.expand(5, 8), 0 * cos.expand(5, 8)).shape == x.shape
    with pytest.raises(TypeCheckError):
        apply_rotary(x, cos, 0 * cos)
