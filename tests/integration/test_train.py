"""Fast tests for attnscope.training (split, tokenizer encoding, a tiny end-to-end training run, checkpoints)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import attnscope.training as T
from attnscope.training import TrainConfig
from attnscope.training import corpora as C

CORPORA = Path("/work/shared/corpora")


def _text(n_lines: int = 200) -> str:
    return "".join(f"line {i}: the quick brown fox {i * 7 % 13}\n" for i in range(n_lines))


def test_split_is_deterministic_disjoint_and_complete():
    text = _text()
    tr, ev = T.split_corpus(text)
    assert (tr, ev) == T.split_corpus(text)
    assert tr + ev == text  # complementary slices: disjoint and nothing lost
    assert tr.endswith("\n")  # cut at a line boundary
    assert len(ev) >= 0.1 * len(text)
    assert len(ev) < 0.1 * len(text) + max(len(line) for line in text.splitlines(True))


def test_split_edge_cases():
    assert T.split_corpus("") == ("", "")
    tr, ev = T.split_corpus("x" * 100)  # no newline at all: plain character cut
    assert (len(tr), len(ev)) == (90, 10)
    tr, ev = T.split_corpus("a" * 95 + "\n" + "b" * 4)  # only newline is after the 90% mark
    assert tr == "a" * 95 + "\n" and ev == "b" * 4


def test_load_corpora_matches_split(tmp_path):
    (tmp_path / "b_two.txt").write_text(_text(50), encoding="utf-8")
    (tmp_path / "a_one.txt").write_text(_text(80), encoding="utf-8")
    (tmp_path / "README.md").write_text("not a corpus", encoding="utf-8")
    c = T.load_corpora(tmp_path)
    assert list(c) == ["a_one", "b_two"]
    assert c["a_one"] == T.split_corpus(_text(80))
    assert set(T.corpus_sha256(tmp_path)) == {"a_one", "b_two"}


@pytest.mark.skipif(not CORPORA.is_dir(), reason="bundled corpora not available")
def test_real_corpora_split():
    c = T.load_corpora(CORPORA)
    assert len(c) >= 2
    for label, (tr, ev) in c.items():
        text = (CORPORA / f"{label}.txt").read_bytes().decode("utf-8")
        assert tr + ev == text
        assert 0.1 <= len(ev) / len(text) < 0.11, label
        assert tr.endswith("\n"), label


def test_encode_text_matches_plain_encode():
    tok = T.train_tokenizer([_text(300), "Hola, ¿qué tal?\n  Grüße   aus\n\tBerlin\n"], vocab_size=300)
    assert tok.token_to_id(T.EOT_TOKEN) == 0
    s = "".join(
        ["  indented  line\n", "x = f(a, b)  \n\n", "word word\n", "\ttab\n", "Ünïcödé  text\n"] * 3000
    )
    a = T.encode_text(tok, s)
    assert len(C._safe_chunks(s)) > 1
    assert np.array_equal(a, np.asarray(tok.encode(s, add_special_tokens=False).ids))
    assert tok.decode(a.tolist()) == s


def test_eval_windows():
    ids = np.arange(1000, dtype=np.int32)
    w = T.eval_windows(ids, 32, 5)
    assert len(w) == 5 and all(len(x) == 32 for x in w)
    assert w[0][0] == 0 and w[-1][-1] == 32 * 31 - 1  # evenly spaced, first and last window
    assert len(T.eval_windows(ids, 32, 1000)) == 31
    assert [len(x) for x in T.eval_windows(ids[:10], 32, 5)] == [10]
    assert T.eval_windows(ids[:1], 32, 5) == []


def _tiny(src, out, **kw) -> TrainConfig:
    return TrainConfig(corpora=src, out=out, seed=0, steps=30, vocab_size=300, n_layer=1, n_embd=32, n_head=2,
                       n_ctx=32, batch_size=8, lr=1e-2, progress=False, eval_max_windows=8, **kw)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    src = tmp_path_factory.mktemp("corpora")
    if CORPORA.is_dir():
        for p in sorted(CORPORA.glob("*.txt"))[:4]:
            text = p.read_bytes().decode("utf-8")[:20000]
            (src / p.name).write_text(text[: text.rfind("\n") + 1], encoding="utf-8")
    else:  # synthetic fallback
        (src / "en.txt").write_text(_text(600), encoding="utf-8")
        (src / "code.txt").write_text("def f(x):\n    return x * 2\n" * 500, encoding="utf-8")
    out = tmp_path_factory.mktemp("demo")
    info = T.train_demo(_tiny(src, out))
    return src, out, info


def test_tiny_training_run_saves_loadable_model(tiny_run):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    src, out, info = tiny_run
    for name in ("model.safetensors", "config.json", "tokenizer.json", "training.json"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "training.json").read_text())
    assert saved["steps"] == info["steps"] == 30
    assert saved["tokens_seen"] == 30 * 8 * 32
    assert set(saved["corpora"]) == {p.stem for p in src.glob("*.txt")}
    assert all(len(v["sha256"]) == 64 for v in saved["corpora"].values())
    assert saved["config"]["model"]["n_layer"] == 1
    ov = saved["eval"]["overall"]
    assert np.isfinite(ov["loss"]) and np.isfinite(ov["unigram"]) and ov["eval_tokens"] > 0
    # loss went down from step 0
    assert saved["loss_curve"][0]["step"] == 0
    assert saved["final_train_loss"] < saved["loss_curve"][0]["loss"] - 0.3

    model = GPT2LMHeadModel.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.dtype == torch.float32
    assert model.config.n_positions == 32 and model.config.activation_function == "gelu_new"
    assert model.config.vocab_size == len(tok) <= 300
    assert tok.eos_token == tok.bos_token == T.EOT_TOKEN and tok.eos_token_id == 0
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tied
    s = "The quick brown fox.\n"
    ids = tok(s)["input_ids"]
    assert tok.decode(ids) == s
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_tiny_training_is_deterministic(tiny_run, tmp_path):
    src, _, info = tiny_run
    again = T.train_demo(_tiny(src, tmp_path))
    assert [c["loss"] for c in again["loss_curve"]] == [c["loss"] for c in info["loss_curve"]]
    assert again["eval"]["overall"]["loss"] == info["eval"]["overall"]["loss"]


def test_checkpoints_are_hf_folders_on_the_same_trajectory(tiny_run, tmp_path):
    """--save-every keeps step-0/10/20/30 folders; saving them does not change the run (same final weights
    and loss curve as the run without checkpoints), and each records step, tokens seen and held-out loss."""
    from safetensors.torch import load_file

    src, out, info = tiny_run
    before = torch.get_num_threads()
    # as many threads as tiny_run (a different count changes float reductions, hence the loss curve)
    ck = T.train_demo(_tiny(src, tmp_path, save_every=10, threads=info["config"]["training"]["torch_threads"]))
    assert [c["loss"] for c in ck["loss_curve"]] == [c["loss"] for c in info["loss_curve"]]
    assert [c["step"] for c in ck["checkpoints"]] == [0, 10, 20, 30]
    folders = sorted(p.name for p in tmp_path.glob("step-*"))
    assert folders == ["step-000000", "step-000010", "step-000020", "step-000030"]
    final = load_file(out / "model.safetensors")
    last = load_file(tmp_path / "step-000030" / "model.safetensors")
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    first = load_file(tmp_path / "step-000000" / "model.safetensors")
    assert not torch.equal(first["transformer.wpe.weight"], last["transformer.wpe.weight"])
    losses = []
    for c in ck["checkpoints"]:
        rec = json.loads((tmp_path / c["path"] / "training.json").read_text())
        assert rec["step"] == c["step"] and rec["tokens_seen"] == c["step"] * 8 * 32
        assert rec["heldout_loss"] == pytest.approx(c["heldout_loss"])
        assert all(len(v["sha256"]) == 64 for v in rec["corpora"].values())
        losses.append(rec["heldout_loss"])
    assert losses[-1] < losses[0] - 0.3  # the series learns
    assert torch.get_num_threads() == before  # restored after the run


def test_threads_option_is_used_and_restored(tiny_run, tmp_path):
    src, _, _ = tiny_run
    before = torch.get_num_threads()
    one = T.train_demo(_tiny(src, tmp_path, threads=1))
    assert one["config"]["training"]["torch_threads"] == 1
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("kw, msg", [
    ({"save_every": 10}, "--save-every needs --steps"),
    ({"steps": 0}, "--steps must be at least 1"),
    ({"amp": "fp8"}, "amp must be"),
])
def test_config_rejects_bad_values(tmp_path, kw, msg):
    from attnscope.core.errors import AttnscopeError

    base = {"corpora": tmp_path, "out": tmp_path / "o"}
    with pytest.raises(AttnscopeError, match=msg):
        TrainConfig(**{**base, **kw})
