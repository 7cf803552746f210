"""The unembedding in the typed weights, and the direct logit effect against the model's own forward pass
(issue 21): adding a vector to the final residual stream, with the final norm frozen, changes the Hugging Face
model's logits by exactly :func:`direct_logit_effect`."""

from __future__ import annotations

import pytest
import torch

from attnscope.core.errors import AttnscopeError
from attnscope.exact.forward import run
from attnscope.models import extract_weights
from attnscope.models.unembed import direct_logit_effect, final_norm_scale


def _frozen_delta(hf, norm_mod, tokens: torch.Tensor, v: torch.Tensor, kind: str):
    """HF logits with ``v`` added to the input of the final norm, minus the clean logits, the norm's scale frozen
    at its clean value; also returns that scale and the clean final residual."""
    seen = {}

    def capture(_m, args):
        seen["x"] = args[0].detach().clone()

    h = norm_mod.register_forward_pre_hook(capture)
    with torch.no_grad():
        clean = hf(tokens[None]).logits[0]
    h.remove()
    x = seen["x"][0].double()
    s = (x.var(-1, unbiased=False) + norm_mod.eps).sqrt() if kind == "layernorm" else \
        (x.pow(2).mean(-1) + norm_mod.variance_epsilon).sqrt()

    def frozen(_m, args, _out):
        y = args[0] + v
        y = y - y.mean(-1, keepdim=True) if kind == "layernorm" else y
        out = y / s.to(y)[..., None] * norm_mod.weight
        return out + norm_mod.bias if kind == "layernorm" else out

    h = norm_mod.register_forward_hook(frozen)
    with torch.no_grad():
        pert = hf(tokens[None]).logits[0]
    h.remove()
    return pert - clean, s, seen["x"][0]


def test_gpt2_tied_unembedding_and_direct_effect_match_the_model(tiny_gpt2_dir):
    from attnscope.models import load_model

    w, hf = load_model(str(tiny_gpt2_dir), dtype="float64", keep_hf=True)  # float64: a tight tolerance
    hf = hf.double()
    assert w.W_U is not None and w.tied_unembedding and w.b_U is None
    assert torch.equal(w.W_U, hf.lm_head.weight.T)
    tokens = torch.arange(5, 25)
    v = torch.randn(w.d_model, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    delta, s, resid = _frozen_delta(hf, hf.transformer.ln_f, tokens, v, "layernorm")
    pred = direct_logit_effect(w, v.expand(len(tokens), -1), s)
    torch.testing.assert_close(pred, delta, rtol=1e-9, atol=1e-9)
    # our own forward's final residual gives the same scale
    ours = run(w, tokens)[-1].resid_post[0]
    torch.testing.assert_close(final_norm_scale(w, ours), s, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ours, resid, rtol=1e-9, atol=1e-9)


def test_weights_to_keeps_the_tied_unembedding_a_view(tiny_gpt2_dir):
    from attnscope.models import load_model

    w = load_model(str(tiny_gpt2_dir))
    w.to(dtype=torch.float64)
    assert w.tied_unembedding and w.W_U.dtype == torch.float64


def test_untied_llama_head_with_rmsnorm_matches_the_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=1)
    hf = LlamaForCausalLM(cfg).eval().double()
    w = extract_weights(hf, name="tiny-llama")
    assert w.W_U is not None and not w.tied_unembedding
    assert torch.equal(w.W_U, hf.lm_head.weight.T)
    tokens = torch.arange(3, 19)
    v = torch.randn(w.d_model, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    delta, s, _ = _frozen_delta(hf, hf.model.norm, tokens, v, "rmsnorm")
    # 1e-7: Hugging Face's RMSNorm computes in float32 even in a float64 model (the clean logits carry that error)
    torch.testing.assert_close(direct_logit_effect(w, v.expand(len(tokens), -1), s), delta, rtol=1e-7, atol=1e-7)


def test_neox_embed_out_is_the_unembedding(tmp_path, tiny_gpt2_dir):
    from conftest import make_tiny_neox
    from transformers import GPTNeoXForCausalLM

    path = make_tiny_neox(tmp_path / "neox", tiny_gpt2_dir, n_layer=1)
    hf = GPTNeoXForCausalLM.from_pretrained(path).eval()
    w = extract_weights(hf)
    assert w.W_U is not None and not w.tied_unembedding
    assert torch.equal(w.W_U, hf.get_output_embeddings().weight.T)  # embed_out (lm_head in newer transformers)


def test_bert_encoder_has_no_output_head():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=32)
    w = extract_weights(BertModel(cfg).eval())
    assert w.W_U is None
    with pytest.raises(AttnscopeError, match="no output head"):
        direct_logit_effect(w, torch.zeros(16))


def test_a_tied_unembedding_leaves_the_fingerprint_as_it_was(tiny_gpt2_dir):
    """A tied W_U is a view of W_E: it is not hashed again, so cache keys of tied models are unchanged."""
    from attnscope.models import load_model

    w = load_model(str(tiny_gpt2_dir))
    with torch.no_grad():
        w.b_in[0, 0] += 1.0  # edited in memory: the fingerprint hashes the tensors
    assert "W_U" not in w.tensors()
    fp = w.fingerprint()
    w.W_U = None
    assert w.fingerprint() == fp
