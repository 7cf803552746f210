"""`attnscope serve`'s API with FastAPI's TestClient on the demo model, checked against independent
references: the model's own layer-0 forward pass, the circuit's formula, and find_neurons' traces."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from attnscope.circuit.build import mlp_input_weights, true_head_output  # noqa: E402
from attnscope.core.texts import text_tokens  # noqa: E402
from attnscope.exact.decomposition import centre  # noqa: E402
from attnscope.exact.forward import iter_layers  # noqa: E402


@pytest.fixture(scope="module")
def served(demo):
    from attnscope.models import load_model
    from attnscope.serve import create_app, load_serve_model

    w = load_model("demo")
    m = load_serve_model(w, log=lambda *_: None)
    return m, TestClient(create_app(m), base_url="http://localhost", raise_server_exceptions=False)


def _text(w, spec: str, n: int) -> tuple[str, torch.Tensor]:
    """The first ``n`` tokens of a bundled text as a string that tokenises back to the same ids."""
    ids = text_tokens(spec, w.tokenizer, max_tokens=n)
    s = w.tokenizer.decode(ids)
    assert w.tokenizer(s, add_special_tokens=False)["input_ids"] == ids.tolist()
    return s, ids


def _reference_bag(m, ids: torch.Tensor, k: int) -> torch.Tensor:
    """The bag + constant written out from the Circuit API (method §7-8), not through serve's class."""
    w, circ = m.w, m.circ
    W, _ = mlp_input_weights(w)
    n_min = circ.settings.min_position
    y_cal, pre_cal, _ = true_head_output(w, circ.heads, circ.calibration_tokens)
    other = (pre_cal[:, k] - centre(y_cal, w) @ W[:, k] / circ.mlp_scale)[n_min:].mean()
    return centre(circ.summary(ids), w) @ W[:, k] / circ.mlp_scale + other


def _reference_pred(m, ids: torch.Tensor, k: int) -> torch.Tensor:
    """What the page must show as "predicted": the full explanation's terms summed (attnscope.neurons.explain)."""
    from attnscope.neurons.explain import build_explainer, explain_terms

    terms = explain_terms(m.w, m.circ, build_explainer(m.w, m.circ), ids, torch.tensor([k]))
    return sum(terms.values())[:, 0]


def test_analyse_true_and_predicted_match_references(served):
    m, c = served
    k = m.table[0].index
    text, ids = _text(m.w, "bundled:es_fortunes", 200)
    r = c.post("/api/analyse", json={"text": text, "neuron": k})
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["n_tokens"] == 200 and d["token_ids"] == ids.tolist() and "".join(d["tokens"]) == text
    true = next(iter_layers(m.w, ids[None], stop_layer=0)).mlp_pre[0, :, k]
    assert torch.allclose(torch.tensor(d["true"]), true, atol=1e-4)
    assert torch.allclose(torch.tensor(d["pred"]), _reference_pred(m, ids, k), atol=1e-4)
    assert d["window_note"] is None and d["explanation"] == m.explanation.kind
    n_min = m.circ.settings.min_position
    assert d["early"] == [i < n_min for i in range(200)]
    assert d["fit"]["n"] == 200 - n_min


def test_prediction_matches_find_neurons_traces(served):
    """serve's prediction equals the full explanation's ``predicted_pre`` trace that find_neurons wrote for
    the same neuron on a source's first reporting window."""
    from attnscope.neurons.find import NeuronSettings, find_neurons

    m, _ = served
    res = find_neurons(m.w, m.circ, progress=False)
    n_min = m.circ.settings.min_position
    from attnscope.neurons.find import held_out_windows

    assert m.explanation.kind == "full layer-0 explanation"
    tr = res.traces[0]
    win = next(s for s in held_out_windows(m.w, m.circ, None, NeuronSettings().max_windows) if s.name == tr.text)
    ids = win.report[0]
    true = next(iter_layers(m.w, ids[None], stop_layer=0)).mlp_pre[0, n_min:, tr.neuron]
    assert torch.allclose(true, torch.tensor(tr.true_pre), atol=1e-4)  # the same window
    pred = m.explanation.predict(ids)[n_min:, tr.neuron]
    assert torch.allclose(pred, torch.tensor(tr.predicted_pre), atol=1e-4)


def test_the_fullest_explanation_is_served(served):
    """The page predicts with the full layer-0 explanation, and within one held-out text it follows the true
    pre-activation better than the bag + constant (which cannot follow the direct path), for the top-ranked
    neurons."""
    from attnscope.serve.analysis import fit_stats
    from attnscope.serve.explanation import BagExplanation

    m, _ = served
    assert m.explanation.kind == "full layer-0 explanation"
    text, ids = _text(m.w, "bundled:es_fortunes", 200)
    a = m.analyser.analyse(text)
    bag = BagExplanation(m.w, m.circ).predict(ids)
    ks = [r.index for r in m.table[:8]]
    r_full = [fit_stats(a.true[:, k], a.pred[:, k], ~a.early)["r"] for k in ks]
    r_bag = [fit_stats(a.true[:, k], bag[:, k], ~a.early)["r"] for k in ks]
    assert sorted(r_full)[4] > 0.8 and sorted(r_full)[4] > sorted(r_bag)[4] + 0.3


def test_evidence_sums_to_prediction(served):
    m, c = served
    k = m.table[1].index
    text, ids = _text(m.w, "bundled:en_moby_dick", 120)
    pred = c.post("/api/analyse", json={"text": text, "neuron": k}).json()["pred"]
    for pos in (0, 60, 119):
        e = c.post("/api/evidence", json={"text": text, "neuron": k, "position": pos}).json()
        assert len(e["contributions"]) == pos + 1 and e["first_token"] == 0
        kern = m.circ.kernel[pos, : pos + 1]
        assert torch.allclose(torch.tensor(e["kernel"]), kern, atol=1e-6)
        assert torch.allclose(torch.tensor(e["contributions"]), kern * torch.tensor(e["scores"]), atol=1e-6)
        total = sum(e["contributions"]) + sum(v for _, v in e["terms"])
        assert total == pytest.approx(e["prediction"], abs=1e-4) and total == pytest.approx(pred[pos], abs=1e-4)


def test_long_text_is_analysed_in_windows(served):
    m, c = served
    text, ids = _text(m.w, "bundled:en_moby_dick", 600)
    d = c.post("/api/analyse", json={"text": text, "neuron": 5}).json()
    T, n_min = m.circ.T, m.circ.settings.min_position
    assert d["n_tokens"] == 600 and len(d["true"]) == 600 and "windows" in d["window_note"]
    wins = d["windows"]
    assert [w["report_from"] for w in wins] == [0, T, 2 * T - n_min] and wins[-1]["stop"] == 600
    for w in wins:  # every reported token: the forward pass on its own window
        assert w["stop"] - w["start"] <= T and (w["report_from"] - w["start"] >= n_min or w["start"] == 0)
        true = next(iter_layers(m.w, ids[None, w["start"] : w["stop"]], stop_layer=0)).mlp_pre[0, :, 5]
        got = torch.tensor(d["true"][w["report_from"] : w["stop"]])
        assert torch.allclose(got, true[w["report_from"] - w["start"] :], atol=1e-4)
    assert sum(d["early"]) == n_min  # only the first window has a warm-up


def test_scope_on_calibration_and_on_a_degenerate_text(served):
    m, c = served
    text, _ = _text(m.w, m.circ.settings.calibration, m.circ.T)
    d = c.post("/api/analyse", json={"text": text, "neuron": 0}).json()
    cond = {x["name"]: x for x in d["conditions"]}
    assert cond["denominators as on calibration"]["measured"] == pytest.approx(1.0, abs=1e-4)
    assert cond["sink mass as on calibration"]["measured"] == pytest.approx(0.0, abs=1e-6)
    assert cond["norm scale as on calibration"]["measured"] == pytest.approx(1.0, abs=0.01)
    # the clipped share on the calibration text is the circuit's own "no outlier tokens" statistic
    circ_clip = next(x.measured for x in m.circ.conditions if x.name == "no outlier tokens")
    assert cond["few clipped content factors"]["measured"] == pytest.approx(circ_clip, abs=1e-6)
    assert d["in_scope"] and d["scope_message"].startswith("All 6 conditions hold")
    d = c.post("/api/analyse", json={"text": "# " * 150, "neuron": 0}).json()  # one token repeated
    assert not d["in_scope"] and d["scope_message"].startswith("This input lies outside the explanation's scope")
    short = c.post("/api/analyse", json={"text": "Hola", "neuron": 0}).json()
    assert [x["name"] for x in short["conditions"]] == ["long enough"] and not short["in_scope"]


def test_contrast_against_forward_pass(served):
    m, c = served
    a, ia = _text(m.w, "bundled:es_fortunes", 150)
    b, ib = _text(m.w, "bundled:en_moby_dick", 150)
    k = m.table[0].index
    d = c.post("/api/contrast", json={"text_a": a, "text_b": b, "neuron": k, "top": 5}).json()
    n_min = m.circ.settings.min_position
    ta = next(iter_layers(m.w, ia[None], stop_layer=0)).mlp_pre[0, n_min:].double()
    tb = next(iter_layers(m.w, ib[None], stop_layer=0)).mlp_pre[0, n_min:].double()
    eff = (ta.mean(0) - tb.mean(0)) / ((ta.var(0) + tb.var(0)) / 2).sqrt()
    assert d["a"]["mean_true"] == pytest.approx(float(ta[:, k].mean()), abs=1e-4)
    assert d["d_true"] == pytest.approx(float(eff[k]), abs=1e-3)
    assert [r["neuron"] for r in d["top"]] == eff.abs().argsort(descending=True)[:5].tolist()
    assert d["a"]["mean_pred"] == pytest.approx(float(_reference_pred(m, ia, k)[n_min:].mean()), abs=1e-4)


def test_contrast_verified_like_for_like(served):
    """Issue 19: ``verify`` adds every neuron's like-for-like verification (the prediction from the verified
    windows' own counts) with the noise ceiling, the token-shuffled null and the token-mean predictor beside it,
    the same numbers as verify_contrast on those windows."""
    from attnscope.neurons.contrast import build_token_model, effect_model
    from attnscope.neurons.verification import fit_token_mean, spread_windows, token_frequencies, verify_contrast

    m, c = served
    a, ia = _text(m.w, "bundled:es_fortunes", 700)
    b, ib = _text(m.w, "bundled:en_moby_dick", 700)
    d = c.post("/api/contrast", json={"text_a": a, "text_b": b, "neuron": 0, "top": 3, "verify": True}).json()
    v = d["verification"]
    assert v["n_windows_a"] >= 2 and v["noise_ceiling"]["spearman_brown"] > 0.5
    assert v["like_for_like"]["spearman"] > v["shuffled_null"]["spearman"] + 0.3
    assert v["like_for_like"]["spearman"] > v["token_mean"]["spearman"]
    assert len(v["token_mean_fitted_on"]) >= 2
    w, circ, n_min = m.w, m.circ, m.circ.settings.min_position
    ids = [ia, ib]  # the text's tokens, no BOS
    wa, wb = (spread_windows(w, x, circ.T, 16) for x in ids)
    em = effect_model(w, circ, build_token_model(w, circ, source_aware_denominators=True))
    assert em.per_source_sd  # as contrast: each side's sd from its own token counts
    ref = verify_contrast(w, em.predict_d, em.sigma, n_min, wa, wb,
                          *(token_frequencies(x[None], w.d_vocab) for x in ids), fit_token_mean(w, n_min, circ.T))[0]
    assert v["like_for_like"]["spearman"] == pytest.approx(ref.like_for_like.spearman, abs=1e-6)
    # the contrast's own scope conditions, from the whole texts' token counts (no forward pass)
    pred = em.predict_d(token_frequencies(ia[None], w.d_vocab), token_frequencies(ib[None], w.d_vocab))
    sc = {x["name"]: x for x in d["scope"]}
    shift = sc["not a common shift"]
    assert shift["measured"] == pytest.approx(float(pred.mean().abs() / pred.pow(2).mean().sqrt()), abs=1e-6)
    assert shift["threshold"] == pytest.approx(0.7082) and not shift["in_flag"]  # measured only (step 10)
    assert shift["ok"] == (shift["measured"] <= 0.7082)
    assert sc["enough positions"]["measured"] >= 600 and sc["enough positions"]["in_flag"]
    assert d["out_of_scope"] == any(x["in_flag"] and not x["ok"] for x in d["scope"])
    assert "verification" not in c.post("/api/contrast", json={"text_a": a, "text_b": b, "neuron": 0}).json()


def test_info_neurons_and_static_files(served):
    m, c = served
    info = c.get("/api/info").json()
    assert info["circuit"]["heads"] == m.circ.heads and info["model"]["name"] == "demo"
    ker = info["circuit"]["kernels_by_offset"]
    assert set(ker) == {f"H{h}" for h in m.circ.heads} | {"shared"}
    assert sum(ker["shared"]) == pytest.approx(1.0, abs=1e-4)
    rows = c.get("/api/neurons").json()["neurons"]
    assert len(rows) == m.w.d_mlp and sorted(r["index"] for r in rows) == list(range(m.w.d_mlp))
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1)) and info["score"] in info["score_name"]
    assert 0 < sum(r["selected"] for r in rows) < len(rows)
    # one token-score quantity (issue 21): the page's card shows the report card's tokens and scores
    saved = m.neurons.cards[0]
    card = c.get(f"/api/neuron/{saved.index}").json()
    n = len(saved.top_positive_tokens)
    assert [t for t, _ in card["top_positive_scores"][:n]] == [t for t, _ in saved.top_positive_tokens]
    for key in ("positive", "negative"):
        shown = [v for _, v in card[f"top_{key}_scores"][:n]]
        assert shown == pytest.approx([v for _, v in getattr(saved, f"top_{key}_tokens")], abs=1e-3)
    assert card["score_definition"].startswith("token score: how far one more occurrence")
    page = c.get("/")
    assert page.status_code == 200 and "attnscope serve" in page.text
    for path in ("/", "/static/serve.js", "/static/serve.css"):  # nothing loaded from the network
        body = c.get(path).text
        urls = set(re.findall(r"(?:src|href)=[\"']([^\"']+)", body)) | set(re.findall(r"url\(([^)]+)\)", body))
        assert all(u.startswith(("/static/", "data:", "#")) for u in urls), urls
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", body)


BAD_REQUESTS = [  # (method, path, JSON body, status, words the error must contain)
    ("post", "/api/analyse", {"text": "", "neuron": 0}, 400, "empty"),
    ("post", "/api/analyse", {"text": "   \n ", "neuron": 0}, 400, "empty"),
    ("post", "/api/analyse", {"text": "hola", "neuron": 768}, 404, "neuron index 768 is out of range"),
    ("post", "/api/analyse", {"text": "hola", "neuron": -1}, 404, "numbered 0..767"),
    ("post", "/api/analyse", {"text": "hola"}, 422, "neuron: Field required"),
    ("post", "/api/analyse", {"text": "hola", "neuron": "x"}, 422, "valid integer"),
    ("post", "/api/analyse", {"text": "x" * 200_001, "neuron": 0}, 413, "more than 200000"),
    ("post", "/api/evidence", {"text": "hola mundo", "neuron": 0, "position": 99}, 404,
     "token position 99 is outside the text: it has 3 tokens"),
    ("post", "/api/contrast", {"text_a": "hola", "text_b": "", "neuron": 0}, 400, "empty"),
    ("post", "/api/contrast", {"text_a": "a", "text_b": "b", "neuron": 0, "top": 0}, 400, "top=0"),
    ("get", "/api/neuron/99999", None, 404, "out of range"),
]


@pytest.mark.parametrize("method,path,body,status,words", BAD_REQUESTS)
def test_bad_requests_are_one_line_json_errors(served, method, path, body, status, words):
    _, c = served
    r = c.post(path, json=body) if method == "post" else c.get(path)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err and "\n" not in err and "Traceback" not in r.text


def test_internal_errors_hide_the_traceback(served, monkeypatch):
    m, c = served

    def boom(*_args, **_kw):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(m.analyser, "analyse", boom)
    r = c.post("/api/analyse", json={"text": "hola", "neuron": 0})
    assert r.status_code == 500
    assert r.json() == {"error": "internal error (RuntimeError); the server log has the details"}


def test_saved_analysis_is_reused(served, tmp_path):
    from attnscope.core.errors import AttnscopeError
    from attnscope.serve import load_serve_model

    m, _ = served
    m.neurons.save(tmp_path / "neurons")  # as `attnscope report` writes it: DIR/neurons beside DIR/circuit
    m.circ.save(tmp_path / "circuit")
    m2 = load_serve_model(m.w, tmp_path, log=lambda *_: None)
    assert m2.circ.heads == m.circ.heads and torch.equal(m2.circ.kernel, m.circ.kernel)
    assert [m2.row_json(r) for r in m2.table] == [m.row_json(r) for r in m.table]  # the same table, loaded
    assert sum(r.passed for r in m2.table) > 0 and any(m2.row_json(r)["label"] for r in m2.table)
    assert m2.source.startswith("saved analysis")
    assert m2.neurons.traces == [] and m2.neurons.evidence is None  # NeuronResult.load(table_only=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AttnscopeError, match="no circuit or neurons.json"):
        load_serve_model(m.w, tmp_path / "empty", log=lambda *_: None)
    with pytest.raises(AttnscopeError, match="is not a folder"):
        load_serve_model(m.w, tmp_path / "missing", log=lambda *_: None)
    p = tmp_path / "neurons" / "neurons.json"  # an analysis of another model
    d = json.loads(p.read_text())
    d["model"].update(name="other", d_mlp=99)
    p.write_text(json.dumps(d))
    with pytest.raises(AttnscopeError, match="was made for model 'other', not 'demo'"):
        load_serve_model(m.w, tmp_path, log=lambda *_: None)
    shutil.rmtree(tmp_path / "circuit")  # a neurons.json without its circuit: refused, not rebuilt
    with pytest.raises(AttnscopeError, match="no circuit/ folder beside"):
        load_serve_model(m.w, tmp_path, log=lambda *_: None)


def test_saved_circuit_is_loaded_not_rebuilt(served, tmp_path, monkeypatch):
    """`attnscope report` saves DIR/circuit (Circuit.save): serve loads it instead of recomputing."""
    from attnscope.serve import load_serve_model, state

    m, _ = served
    m.circ.save(tmp_path / "circuit")
    m.neurons.save(tmp_path / "neurons")

    def no_rebuild(*_a, **_k):
        raise AssertionError("the saved circuit should have been loaded")

    monkeypatch.setattr(state, "build_circuit", no_rebuild)
    m2 = load_serve_model(m.w, tmp_path, log=lambda *_: None)
    assert torch.equal(m2.circ.ext, m.circ.ext) and torch.equal(m2.circ.head_kernels, m.circ.head_kernels)
    text, ids = _text(m.w, "bundled:es_fortunes", 100)
    k = m.table[0].index
    assert torch.allclose(m2.analyser.analyse(text).pred[:, k], _reference_pred(m, ids, k), atol=1e-4)
