"""attnscope evolution: checkpoint discovery, per-checkpoint summaries against independent references,
caching (adding a checkpoint recomputes only that one), the timeline, outputs, and one-line CLI errors."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from conftest import make_tiny_gpt2

import attnscope.evolution.run as E
from attnscope.core.errors import AttnscopeError
from attnscope.kernels.analysis import KernelSettings
from attnscope.neurons.find import NeuronSettings


def _fast() -> E.EvolutionSettings:
    return E.EvolutionSettings(kernel=KernelSettings(n_samples=2, n_heldout=1), neuron=NeuronSettings(max_windows=2),
                               top_k=5)


def _ckpt(folder, step: int, seed: int, loss: float, init_range: float = 0.02):
    make_tiny_gpt2(folder, seed=seed, init_range=init_range)
    (folder / "training.json").write_text(json.dumps({"step": step, "tokens_seen": step * 64, "heldout_loss": loss}))
    return folder


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    root = tmp_path_factory.mktemp("series")
    # folder names in the opposite order of the steps: the order must come from training.json
    _ckpt(root / "b-late", 20, 1, 5.0, init_range=0.2)  # sharp heads: no contextual head
    _ckpt(root / "a-early", 0, 0, 6.0)  # near-uniform heads
    return root


def test_discover_orders_by_recorded_step(series, tmp_path):
    refs = E.discover_checkpoints([str(series)])
    assert [(r.step, r.tokens_seen, r.heldout_loss) for r in refs] == [(0, 0, 6.0), (20, 1280, 5.0)]
    one = E.discover_checkpoints([str(series / "b-late"), str(series / "a-early")])
    assert [r.step for r in one] == [0, 20]
    hub = E.discover_checkpoints(["EleutherAI/pythia-70m@step1000", "EleutherAI/pythia-70m@step143000"])
    assert [r.step for r in hub] == [1000, 143000]
    with pytest.raises(AttnscopeError, match="neither a model folder"):
        E.discover_checkpoints([str(tmp_path)])
    with pytest.raises(AttnscopeError, match="no checkpoints given"):
        E.discover_checkpoints([])


def test_ground_truth_matches_the_models_own_activations(tiny_gpt2):
    """d from the recompute equals d from the Hugging Face model's own c_fc outputs (hooks) on the same
    reporting windows."""
    from attnscope.circuit.build import CircuitSettings, build_circuit
    from attnscope.exact.forward import hf_activations

    w, hf = tiny_gpt2
    circ = build_circuit(w, CircuitSettings(heads=[0, 1]))
    windows, d_tune, d_report = E.ground_truth(w, circ, _fast())
    n_min = circ.settings.min_position
    acts = [hf_activations(hf, x.report)[1][0][:, n_min:].reshape(-1, w.d_mlp).double() for x in windows]
    c = [x.name for x in windows].index("de_fortunes")
    a, rest = acts[c], torch.cat([b for j, b in enumerate(acts) if j != c])
    ref = (a.mean(0) - rest.mean(0)) / ((a.var(0, unbiased=False) + rest.var(0, unbiased=False)) / 2).sqrt()
    assert d_report.shape == (len(windows), w.d_mlp) and len(windows) == len(E.TRACKED_CONTEXTS) + 5
    torch.testing.assert_close(d_report[c].double(), ref, atol=1e-3, rtol=1e-3)
    assert ref.abs().max() > 0.3  # not a comparison of zeros
    assert not torch.allclose(d_tune, d_report)  # two disjoint halves


@pytest.fixture(scope="module")
def result(series, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("ATTNSCOPE_CACHE", str(tmp_path_factory.mktemp("cache")))
    return E.run_evolution([str(series)], _fast())


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_summary_numbers_are_the_analyses(result, series):
    from attnscope.circuit.build import build_circuit
    from attnscope.kernels.analysis import analyse_kernels
    from attnscope.models import load_model

    c = result.checkpoints[0]
    assert (c.step, c.tokens_seen, c.heldout_loss) == (0, 0, 6.0)
    w = load_model(str(series / "a-early"))
    kr = analyse_kernels(w, _fast().kernel, progress=False)
    assert [(h.layer, h.head, h.category, h.n_eff, h.sink_mass) for h in c.heads] == \
        [(r.layer, r.head, r.category, r.n_eff, r.sink_mass) for r in kr.records]
    circ = build_circuit(w)
    assert c.contextual_heads == circ.heads
    assert [(x.name, x.ok) for x in c.conditions] == [(x.name, bool(x.ok)) for x in circ.conditions]
    assert [h.chosen for h in c.head_criteria] == [d.chosen for d in circ.decisions]
    assert [(h.measured["broad kernel"], h.measured["weak content dependence"], h.measured["shared kernel"])
            for h in c.head_criteria] == [(d.n_eff, d.logit_std, d.share_tv) for d in circ.decisions]
    # a chosen head passes every criterion
    assert all(all(h.criteria.values()) for h in c.head_criteria if h.chosen)
    windows, _, d = E.ground_truth(w, circ, _fast())
    names = [x.name for x in windows]
    for cn in c.context_neurons:
        row = d[names.index(cn.context)]
        assert cn.index == int(row.argmax()) and cn.d == pytest.approx(float(row.max()), abs=1e-5)
        assert 1 <= cn.rank <= w.d_mlp
    assert [n.rank for n in c.top_neurons] == list(range(1, 6))
    assert all(a.effect >= b.effect for a, b in zip(c.top_neurons, c.top_neurons[1:]))
    # the late checkpoint has no contextual head: recorded, with every head's criteria and no neurons
    late = result.checkpoints[1]
    assert late.contextual_heads == [] and "no contextual heads" in late.circuit_error
    assert len(late.head_criteria) == 4 and not any(h.chosen for h in late.head_criteria)
    assert not all(all(h.criteria.values()) for h in late.head_criteria)
    assert late.top_neurons == [] and all(cn.rank is None for cn in late.context_neurons)


def test_cache_adding_a_checkpoint_recomputes_only_that_one(result, series, tmp_path, monkeypatch):
    calls = []
    real = E.build_circuit
    monkeypatch.setattr(E, "build_circuit", lambda w, s=None: calls.append(w.name) or real(w, s))
    again = E.run_evolution([str(series)], _fast())
    assert calls == []  # both from the cache
    assert [c.to_json() for c in again.checkpoints] == [c.to_json() for c in result.checkpoints]
    extra = _ckpt(series / "c-last", 40, 2, 4.5, init_range=0.2)  # the cache key follows the model's path too
    try:
        more = E.run_evolution([str(series)], _fast())
    finally:
        shutil.rmtree(extra)
    assert set(calls) == {str(extra)}  # (twice: the second run forces every head to record the criteria)
    assert [c.step for c in more.checkpoints] == [0, 20, 40]
    assert [c.to_json() for c in more.checkpoints[:2]] == [c.to_json() for c in result.checkpoints]


def test_corrupt_summary_is_dropped_and_recomputed(result, series, monkeypatch, caplog):
    from attnscope.core.cache import cache_dir, cache_info

    entries = sorted((cache_dir() / "evolution").glob("*.json"))
    assert len(entries) >= 2 and cache_info()["kinds"]["evolution"]["entries"] == len(entries)
    entries = [e for e in entries if json.loads(e.read_text())["spec"] == result.checkpoints[0].spec]
    entries[0].write_text('{"truncated": ')  # a half-written or damaged entry
    calls = []
    real = E.build_circuit
    monkeypatch.setattr(E, "build_circuit", lambda w, s=None: calls.append(w.name) or real(w, s))
    with caplog.at_level("WARNING"):
        again = E.run_evolution([str(series)], _fast())
    assert "dropped unreadable cache entry" in caplog.text and calls  # recomputed, with one logged line
    untimed = lambda cs: [{k: v for k, v in c.to_json().items() if k != "seconds"} for c in cs]  # noqa: E731
    assert untimed(again.checkpoints) == untimed(result.checkpoints)
    rewritten = E.CheckpointSummary.from_json(json.loads(entries[0].read_text()))  # rewritten, readable again
    assert rewritten.fingerprint in {c.fingerprint for c in result.checkpoints}


def test_no_checkpoint_outlives_its_analysis(series, monkeypatch):
    """Memory does not grow with the number of checkpoints: each model is freed before the next loads."""
    import gc
    import weakref

    alive, refs, real = [], [], E.load_model

    def load(*a, **k):
        gc.collect()
        alive.append(sum(r() is not None for r in refs))  # models still alive when the next one loads
        w = real(*a, **k)
        refs.append(weakref.ref(w))
        return w

    monkeypatch.setattr(E, "load_model", load)
    res = E.run_evolution([str(series)], _fast(), cache=False)
    gc.collect()
    assert len(refs) == len(res.checkpoints) == 2 and alive == [0, 0]
    assert all(r() is None for r in refs)


def _summary(step, cats, ok, d, selected, top):
    heads = [E.HeadPoint(0, h, c, 10.0, None, 0.1) for h, c in enumerate(cats)]
    conds = [E.ConditionPoint("a", ok[0], 0.0, 1.0), E.ConditionPoint("never", False, 2.0, 1.0)]
    ctx = [E.ContextNeuron("es_fortunes", 7, d, 1, 3, selected)]
    tops = [E.NeuronPoint(k, i + 1, 5.0 - i, None, ["x", str(k)]) for i, k in enumerate(top)]
    return E.CheckpointSummary(f"ck{step}", step, step * 10, 1.0, "f", heads, [0], [], conds, None, len(top), tops,
                               ctx, 0.0)


def test_timeline_on_known_summaries():
    cks = [_summary(0, ["uniform", "uniform"], [False], 0.2, False, [1, 2]),
           _summary(100, ["slow decay", "uniform"], [True], 1.5, False, [2, 3]),
           _summary(200, ["slow decay", "uniform"], [False], 2.0, True, [3, 4]),
           _summary(300, ["sharp local decay", "uniform"], [True], 2.5, True, [3, 4])]
    tl = E.timeline(cks)
    assert tl.layer0_heads["0"].leaves_uniform_step == 100
    assert tl.layer0_heads["1"].leaves_uniform_step is None
    assert tl.conditions_first_pass == {"a": 100, "never": None}
    assert tl.never_passing_conditions == ["never"]
    assert tl.all_conditions_first_pass is None and tl.conditions_hold_from == {"a": 300, "never": None}
    assert tl.all_but_never_passing_first_pass == 100
    es = tl.context_neurons["es_fortunes"]
    assert (es.first_true_step, es.first_found_step, es.found_from_step) == (100, 200, 200)
    p = tl.neuron_persistence
    assert (p[0].kept, p[0].appeared, p[0].disappeared) == ([2], [3], [1])
    assert p[2].kept == [3, 4] and p[2].token_overlap_kept == 1.0
    # top tokens ["x", "2"] vs ["x", "4"]: Jaccard 1/3 >= 0.3, so 4 (new) is matched to 2 (gone) by evidence
    assert [(m.appeared, m.disappeared) for m in p[1].matched_by_tokens] == [(4, 2)]
    assert p[1].matched_by_tokens[0].overlap == pytest.approx(1 / 3)
    assert E.Timeline.from_json(json.loads(json.dumps(tl.to_json()))) == tl  # saved and loaded back, typed


def test_outputs_and_reload(result, tmp_path):
    from attnscope.evolution.page import evolution_figures, write_evolution_page

    path = result.save(tmp_path)
    back = E.EvolutionResult.load(path)
    assert back.to_json() == json.loads(json.dumps(result.to_json()))
    figs = evolution_figures(result, tmp_path)
    assert all(p.is_file() and p.stat().st_size > 5000 for p in figs.values())
    page = write_evolution_page(result, tmp_path, figs, command="attnscope evolution x").read_text()
    assert page.count("data:image/png;base64,") == 3 and "Formation timeline" in page and "<style>" in page


@pytest.mark.parametrize("args, msg", [
    (["./no/such/checkpoints"], "no model folder at ./no/such/checkpoints"),
    (["{empty}"], "neither a model folder"),
    (["EleutherAI/pythia-70m@"], "hub-id@revision"),
    (["{series}", "--top-k", "0"], "--top-k 0 must be at least 1"),
])
def test_cli_bad_inputs_are_one_line(args, msg, series, tmp_path, monkeypatch, capsys):
    from attnscope.cli import app as cli

    args = [a.format(empty=tmp_path, series=series) for a in args]
    monkeypatch.setattr(sys, "argv", ["attnscope", "evolution", *args, "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and msg in err and "Traceback" not in err


@pytest.mark.parametrize("args, msg", [
    (["--steps", "0"], "--steps must be at least 1"),
    (["--save-every", "10"], "--save-every needs --steps"),
    (["--corpora", "/no/such/corpora"], "is not a folder"),
])
def test_train_demo_bad_inputs_are_one_line(args, msg, tmp_path, monkeypatch, capsys):
    from attnscope.cli import app as cli

    (tmp_path / "en.txt").write_text("some text\n" * 50)
    corpora = ["--corpora", str(tmp_path)] if "--corpora" not in args else []
    monkeypatch.setattr(sys, "argv", ["attnscope", "train-demo", "--out", str(tmp_path / "o"), *corpora, *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and msg in err, err


def test_train_demo_command_prints_heldout_loss_and_keeps_checkpoints(tmp_path, monkeypatch, capsys):
    from attnscope.cli import app as cli

    src = tmp_path / "corpora"
    src.mkdir()
    for i, name in enumerate(["en", "code"]):
        (src / f"{name}.txt").write_text("".join(f"{name} line {j} of text {j * 7 % 13}\n" for j in range(400 + i)))
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["attnscope", "train-demo", "--corpora", str(src), "--out", str(out),
                                      "--steps", "4", "--save-every", "2", "--batch-size", "2", "--n-ctx", "32",
                                      "--n-embd", "32", "--threads", "1"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 0
    first = capsys.readouterr().out.splitlines()[0]
    d = json.loads(first)
    rec = json.loads((out / "training.json").read_text())
    assert d["heldout_loss"] == round(rec["eval"]["overall"]["loss"], 4) and d["steps"] == 4
    assert d["checkpoints"] == 3 and sorted(p.name for p in out.glob("step-*")) == \
        ["step-000000", "step-000002", "step-000004"]
    assert [r.step for r in E.discover_checkpoints([str(out)])] == [0, 2, 4]
