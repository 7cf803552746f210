"""Model adapters: shapes, resolution and one-line errors."""

from __future__ import annotations

import pytest
import torch

from attnscope.core.errors import IndexOutOfRangeError, ModelNotFoundError, check_index
from attnscope.models import load_model, resolve


def test_gpt2_adapter_shapes(tiny_gpt2):
    w, hf = tiny_gpt2
    assert (w.n_layers, w.n_heads, w.d_model, w.d_head, w.d_mlp) == (2, 4, 64, 16, 256)
    assert w.positional == "learned" and w.causal and w.norm_placement == "pre"
    assert w.W_pos.shape == (128, 64) and w.W_E.shape[1] == 64
    # per-head split of GPT-2's fused c_attn: head 1's query columns are 16..31 of the first third
    torch.testing.assert_close(w.W_Q[0, 1], hf.transformer.h[0].attn.c_attn.weight[:, 16:32])
    torch.testing.assert_close(w.W_V[1, 3], hf.transformer.h[1].attn.c_attn.weight[:, 128 + 48 : 128 + 64])
    assert w.attn_scale.tolist() == [4.0, 4.0]
    V, d, T, L = w.d_vocab, 64, 128, 2  # GPT-2 parameter count, tied unembedding counted once
    assert w.n_params == V * d + T * d + L * (12 * d * d + 13 * d) + 2 * d


def test_llama_gqa_expanded(smollm2):
    w, hf = smollm2
    assert w.W_K.shape == (30, 9, 576, 64)
    # query heads 0,1,2 share KV head 0 and heads 3,4,5 share KV head 1
    torch.testing.assert_close(w.W_K[0, 0], w.W_K[0, 2])
    assert not torch.equal(w.W_K[0, 2], w.W_K[0, 3])
    torch.testing.assert_close(w.W_K[0, 3], hf.model.layers[0].self_attn.k_proj.weight[64:128].T)
    assert w.rope_theta == 100000.0 and w.W_pos is None and w.prepend_bos


def test_bert_adapter(minilm):
    w, _ = minilm
    assert w.model_type == "bert" and not w.causal and w.norm_placement == "post"
    assert w.W_type is not None and w.ln_emb_w is not None and w.n_ctx == 512


def test_unembedding_of_the_packaged_models(smollm2, minilm, demo):
    """SmolLM2 and the demo model tie their unembedding to the token embedding (a view, one storage); the MiniLM
    package ships only the encoder: no output head (issue 21)."""
    for w, hf in (smollm2, demo):
        assert w.W_U is not None and w.W_U.shape == (w.d_model, w.d_vocab)
        torch.testing.assert_close(w.W_U, hf.get_output_embeddings().weight.T)
        assert w.tied_unembedding == bool(hf.config.tie_word_embeddings)
    assert minilm[0].W_U is None


def test_resolve_paths(tiny_gpt2_dir, tmp_path):
    assert resolve(str(tiny_gpt2_dir)).kind == "folder"
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ModelNotFoundError, match="not a .gguf"):
        resolve(str(tmp_path / "x.txt"))
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve(str(tmp_path))


def test_missing_file_is_one_line():
    with pytest.raises(ModelNotFoundError) as e:
        load_model("./no/such/model.gguf")
    assert "no such file or folder" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("spec,words", [("no-such-org-xyz/definitely-not-a-model", "hub"),
                                        ("EleutherAI/pythia-70m@step1000", "pythia-70m@step1000")])  # a revision
def test_unknown_model_offline_is_one_line(monkeypatch, spec, words):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as e:
        load_model(spec)
    msg = str(e.value)
    assert "\n" not in msg and words in msg and "pass its folder" in msg


def test_check_index():
    assert check_index("head", 3, 4) == 3
    with pytest.raises(IndexOutOfRangeError,
                       match=r"head index 4 is out of range: this model has 4 heads, numbered 0..3"):
        check_index("head", 4, 4)
    with pytest.raises(IndexOutOfRangeError):
        check_index("layer", -1, 2)


def test_fingerprint_changes_with_weights(tiny_gpt2):
    w, _ = tiny_gpt2
    f0 = w.fingerprint()
    assert f0 == w.fingerprint() and len(f0) == 16
    old = w.W_K[0, 0, 0, 0].item()
    w.W_K[0, 0, 0, 0] += 1.0
    try:
        assert w.fingerprint() != f0
    finally:
        w.W_K[0, 0, 0, 0] = old
