"""Later-layer circuits (issue 11): effective embeddings, the layer view, propagation, the CLI's bad inputs."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from statistics import median

import pytest
import torch
from conftest import DATA

from attnscope.core.texts import load_windows
from attnscope.exact.forward import iter_layers
from attnscope.later.effective import approximation_error, estimate, layer_view, sample_activations


def _zeroed(w, upto: int):
    """A copy of ``w`` whose layers ``< upto`` write nothing into the residual."""
    W_O, b_O, W_out, b_out = w.W_O.clone(), w.b_O.clone(), w.W_out.clone(), w.b_out.clone()
    for t in (W_O, b_O, W_out, b_out):
        t[:upto] = 0
    return replace(w, W_O=W_O, b_O=b_O, W_out=W_out, b_out=b_out)


@pytest.fixture(scope="module")
def tiny3(tmp_path_factory):
    from conftest import make_tiny_gpt2

    from attnscope.models import load_model

    return load_model(str(make_tiny_gpt2(tmp_path_factory.mktemp("tiny3"), n_layer=3, n_ctx=64, seed=3)))


def _windows(w, n, T=64, seed=0):
    return load_windows(str(DATA / "moby.txt"), w.tokenizer, T, n, seed=seed)[0]


def test_effective_embeddings_exact_when_earlier_layers_are_zeroed(tiny3):
    w = _zeroed(tiny3, 2)
    sample, held = _windows(w, 6), _windows(w, 3, seed=1)
    eff = estimate(w, 2, sample_activations(w, sample, [2]))
    assert eff.fit_fvu < 1e-6
    assert eff.fallback_r2 == pytest.approx(1.0, abs=1e-3)  # float32 direct path
    err = approximation_error(w, eff, held, n_min=1)
    assert err["fvu"] < 1e-6  # unseen tokens too: the direct path is exact here
    # E + pi reproduces W_E + W_pos up to a constant shared by every position
    T = held.shape[1]
    diff = eff.residual(held) - (w.W_E[held] + w.W_pos[:T])
    assert (diff - diff[0, 0]).abs().max() < 1e-3  # float32


def test_effective_embeddings_not_exact_on_the_trained_model(demo):
    w, _ = demo
    sample, held = _windows(w, 16, T=128), _windows(w, 4, T=128, seed=1)
    eff = estimate(w, 2, sample_activations(w, sample, [2]))
    err = approximation_error(w, eff, held, n_min=16)
    assert 0.05 < err["fvu"] < 0.7 and eff.fit_fvu < err["fvu"]  # in-sample fit is better than held-out
    assert err["fvu_token_only"] > err["fvu"]  # the positional part explains something


def test_layer0_estimate_recovers_the_embeddings(demo):
    w, _ = demo
    win = _windows(w, 4, T=128)
    sa = sample_activations(w, win, [0])
    exact = estimate(w, 0, sa)
    assert exact.exact and torch.equal(exact.E, w.W_E.float())
    est = estimate(w, 0, sa, force_estimate=True)
    seen = est.counts > 0
    shift = (est.E[seen] - w.W_E[seen]).mean(0)
    assert (est.E[seen] - w.W_E[seen] - shift).abs().max() < 1e-3
    assert est.fit_fvu < 1e-6


def test_layer_view_runs_layer_l_on_effective_inputs(tiny3):
    w = _zeroed(tiny3, 2)
    win = _windows(w, 4)
    sa = sample_activations(w, win, [2])
    view = layer_view(w, estimate(w, 2, sa))
    assert view.n_layers == 1 and torch.equal(view.W_Q[0], w.W_Q[2])
    true = list(iter_layers(w, win[:2], stop_layer=2))[2].pattern
    approx = next(iter_layers(view, win[:2], stop_layer=0)).pattern
    assert (true - approx).abs().max() < 2e-3  # float32 sums in another order


def test_propagation_is_identity_through_silent_layers(tiny3):
    from attnscope.later.method import propagation

    w = _zeroed(tiny3, 3)
    sa = sample_activations(w, _windows(w, 2), [0, 1, 2])
    G, R = propagation(w, sa, 0, 2)
    assert torch.allclose(G, torch.eye(w.d_model), atol=1e-6) and torch.allclose(R, torch.eye(w.d_model), atol=1e-6)
    G, _ = propagation(tiny3, sample_activations(tiny3, _windows(tiny3, 2), [0, 1, 2]), 0, 2)
    assert (G - torch.eye(w.d_model)).abs().max() > 1e-3


def test_later_path_at_layer0_reproduces_the_layer0_circuit(demo):
    from attnscope.circuit.build import build_circuit
    from attnscope.exact.decomposition import centre
    from attnscope.later.method import LaterSettings, build_later

    w, _ = demo
    circ = build_circuit(w)
    lc = build_later(w, 0, s=LaterSettings(max_windows=2))
    assert lc.circuits[0].heads == circ.heads
    assert torch.allclose(lc.circuits[0].ext, circ.ext)
    assert torch.allclose(lc.token_model.parts["contextual bag"], centre(circ.ext, w))
    assert lc.token_model.parts["earlier layers"].abs().max() == 0


@pytest.fixture(scope="module")
def later1(demo):
    from attnscope.later.evaluate import find_later_neurons
    from attnscope.later.method import LaterSettings

    return find_later_neurons(demo[0], 1, s=LaterSettings(max_windows=2, n_cards=2, n_random=8))


def test_later_layer_scores_beat_the_null(demo, later1):
    w, res = demo[0], later1
    assert 0.05 < res.circuit.pieces[1].approximation.fvu < 0.6
    assert res.circuit.approximation_with_earlier_terms.fvu < res.circuit.pieces[1].approximation.fvu
    assert res.median_spearman("full") > 0.6
    assert res.median_spearman("full") > res.median_spearman("shuffled") + 0.5
    # the noise ceiling: the tuning half's own true effect sizes against the reporting half's
    assert len(res.ceiling) == len(res.sources) and res.median_ceiling > res.median_spearman("shuffled") + 0.5
    assert len(res.rows) == w.d_mlp


def test_later_layer_is_verified_like_for_like(later1):
    """Issue 19: each one-vs-rest contrast of layer L, the prediction from the reporting windows' own counts
    against their truth, with the tuning-half prediction, token-mean (calibration text) and null beside it."""
    res = later1
    assert set(res.like_for_like) == set(res.scores["full"]) and len(res.like_for_like) == len(res.sources)
    for v in res.like_for_like.values():
        assert v.whole_source.predictor.startswith("tuning-half counts")
        assert v.token_mean_fitted_on == [res.settings["circuit"]["calibration"]]
        assert v.like_for_like.spearman > v.shuffled_null.spearman + 0.3
    assert median(v.headline for v in res.like_for_like.values()) > 0.6


def test_later_result_round_trip(later1, tmp_path):
    from attnscope.circuit.result import Condition
    from attnscope.later.result import LaterCircuitRecord, LaterResult

    res = later1
    assert isinstance(res.circuit, LaterCircuitRecord) and res.circuit.layer == 1
    assert res.circuit.pieces[0].heads and all(isinstance(c, Condition) for c in res.circuit.pieces[0].conditions)
    back = LaterResult.load(res.save(tmp_path / "L1"))
    assert json.loads(json.dumps(back.to_json())) == json.loads(json.dumps(res.to_json()))  # floats survive exactly
    assert back.circuit == res.circuit and back.threshold == res.threshold and back.cards == res.cards
    assert back.ceiling == res.ceiling and back.verification == res.verification
    assert back.like_for_like == res.like_for_like
    assert back.median_spearman("full") == res.median_spearman("full")
    with (tmp_path / "L1" / "neurons.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    assert len(rows) == 1 + len(res.rows) and rows[0][:2] == ["index", "rank"]
    assert [int(r[0]) for r in rows[1:]] == [r.index for r in res.rows]


def test_later_cards_evidence_is_the_true_pre_activation_beside_the_cards_fit(demo, later1):
    """Issue 21: each later-layer card's top windows hold the TRUE pre-activation of the MLP of L (peak first),
    its predicted row is the cards' per-position fit, and its logits are W_out[L][n] through W_U."""
    from attnscope.later.method import LaterSettings, build_later
    from attnscope.later.truth import layer_pre
    from attnscope.models.unembed import direct_logit_effect

    w, res = demo[0], later1
    ev = res.evidence
    assert ev is not None and [e.neuron for e in ev.examples] == [c.index for c in res.cards]
    lc = build_later(w, 1, None, LaterSettings(max_windows=2, n_cards=2, n_random=8))
    wins = {x.name: x for x in lc.windows}
    for ne in ev.examples:
        for x in ne.examples:
            y = layer_pre(w, wins[x.text].report[x.window][None], 1)[0, x.start : x.start + len(x.tokens), ne.neuron]
            torch.testing.assert_close(torch.tensor(x.true, dtype=torch.float64), y.double(), atol=1e-3, rtol=1e-4)
            assert x.peak == int(torch.tensor(x.true).argmax()) and len(x.predicted) == len(x.true)
        assert sum(sum(h.counts) for h in ne.histograms) == sum(h.n for h in ne.histograms)
    for e in ev.logits.effects:
        eff = direct_logit_effect(w, w.W_out[1][e.neuron], ev.logits.scale)
        assert e.top[0][1] == pytest.approx(float(eff.max()), abs=1e-4)


def test_report_renders_a_saved_later_result(later1, tmp_path):
    from html.parser import HTMLParser

    from attnscope.later.result import LaterResult
    from attnscope.report import write_report
    from attnscope.report.html import fmt

    back = LaterResult.load(later1.save(tmp_path / "L1"))  # what `neurons --layer 1 --out DIR` writes
    page = write_report(tmp_path / "rep", later=[back]).read_text(encoding="utf-8")
    ids = []

    class P(HTMLParser):
        def handle_starttag(self, tag, attrs):
            ids.extend(v for k, v in attrs if k == "id")

    P().feed(page)
    assert {"later-layers", "later-summary", "later-L1", "later-ranking-L1"} <= set(ids)
    assert [f"neuron-1-{c.index}" for c in later1.cards] == [i for i in ids if i.startswith("neuron-1-")]
    assert later1.cards and len(later1.cards) == 2
    summary = page[page.index('id="later-summary"'):page.index("</table>", page.index('id="later-summary"'))]
    for p in ("full", "token_mean", "shuffled"):
        assert f"<td>{fmt(later1.median_spearman(p))}</td>" in summary
    assert f"<td>{later1.verification.n_passed}</td>" in summary
    assert "0, 1, 4, 5, 7" in page  # layer 0's contextual heads, in the layer table
    c = later1.cards[0]
    card = page[page.index(f'id="neuron-1-{c.index}"'):]
    assert f"<h3>L1N{c.index}</h3>" in card  # one naming scheme: L{layer}N{index}, in the ranking too
    rk = page[page.index('id="later-ranking-L1"'):]
    assert f"<td>L1N{later1.rows[0].index}</td>" in rk[: rk.index("</table>")]
    s0 = next(iter(c.true_d))
    assert f"<td>{s0}</td><td>{fmt(c.predicted_d[s0])}</td><td>{fmt(c.true_d[s0])}</td>" in card
    assert 'id="neurons"' not in page and "later layers only" in page


@pytest.fixture(scope="module")
def lc1(demo):
    from attnscope.later.method import LaterSettings, build_later
    from attnscope.later.truth import truth_data

    lc = build_later(demo[0], 1, s=LaterSettings(max_windows=2))
    return lc, truth_data(demo[0], lc, "bundled:en_moby_dick")


def test_hybrid_is_the_token_mean_without_broad_heads(demo, lc1):
    from attnscope.later.evaluate import predictors

    lc, td = lc1
    none, _ = predictors(demo[0], lc, td, neff_min=float("inf"))
    assert torch.allclose(none["hybrid"], none["token_mean"], atol=1e-9)
    some, parts = predictors(demo[0], lc, td, neff_min=16.0)
    assert (some["hybrid"] - some["token_mean"]).abs().max() > 0.05
    assert torch.allclose(sum(parts["hybrid"].values()), some["hybrid"])


def test_broad_heads_token_means_match_a_direct_average(demo, lc1):
    from attnscope.exact.decomposition import centre
    from attnscope.later.context import broad_heads

    w, (lc, _) = demo[0], lc1
    sample = torch.cat([x.tune for x in lc.windows])
    body = sample[:, lc.n_min:]
    x = int(body.reshape(-1).bincount().argmax())  # the most frequent token
    unseen = next(i for i in range(w.d_vocab) if not (body == i).any())
    groups = torch.zeros(3, w.d_vocab)
    groups[0, x] = 5.0  # p = one-hot on x: p . C = C[x]
    groups[1, unseen] = 1.0  # a token never seen at positions >= n_min: the overall mean
    groups[2, x], groups[2, unseen] = 1.0, 3.0  # a mixture: linear in p
    heads, fns, C = broad_heads(w, lc, 16.0, groups)
    bag = next(h for h in heads if h.head == "bag")
    assert bag.layer == 0 and bag.f is None and all(h.n_eff >= 16 and h.layer < 1 for h in heads)
    ys = torch.stack([centre(lc.circuits[0].summary(t).float().cpu() @ (lc.gain[0] * lc.G[0]), w) for t in sample])
    on_x = ys[:, lc.n_min:][body == x].mean(0)
    overall = ys[:, lc.n_min:].reshape(-1, w.d_model).mean(0)
    assert torch.allclose(bag.held[0].float(), on_x, atol=1e-4)
    assert torch.allclose(bag.held[1].float(), overall, atol=1e-4)
    assert torch.allclose(bag.held[2].float(), 0.25 * on_x + 0.75 * overall, atol=1e-4)
    # the per-token table of the summed output holds the sum of every head's p . C_h
    assert len(fns) == len(heads)
    assert torch.allclose(C[x], sum(h.held[0] for h in heads), atol=1e-4)
    assert torch.allclose(C[unseen], sum(h.held[1] for h in heads), atol=1e-4)


def test_hybrid_per_position_is_token_mean_plus_broad_deviation(demo, lc1):
    from attnscope.later.evaluate import predictors

    w, (lc, td) = demo[0], lc1
    _, parts = predictors(w, lc, td, neff_min=16.0)
    hp = parts["positions"]
    t = lc.windows[0].report[0]
    k = torch.tensor([0, 5, 17])
    p = hp.parts(w, t, k)
    body = torch.cat([x.tune for x in lc.windows])[:, lc.n_min:]
    seen = torch.bincount(body.reshape(-1), minlength=w.d_vocab)[t] > 0
    assert 0 < int(seen.sum()) < len(t)  # both kinds occur in this window
    assert torch.allclose(p["token mean"][seen], td.M[t][seen][:, k].float())
    # unseen tokens: the weights-only composition's token score, shifted to the seen tokens' means
    tm = lc.token_model
    S = (sum(tm.parts.values()) @ tm.W_in / tm.scale).double().cpu()[:, k]
    diff = p["token mean"][~seen].double() - S[t[~seen]]
    assert torch.allclose(diff, diff[0].expand_as(diff), atol=1e-4)
    # averaged over the sample's positions holding a token, the broad heads' deviation is zero (what the
    # token mean holds is not counted twice)
    sample = torch.cat([x.tune for x in lc.windows])
    x = int(sample[:, lc.n_min:].reshape(-1).bincount().argmax())
    dev = torch.cat([hp.parts(w, s, k)["broad heads"][lc.n_min:][s[lc.n_min:] == x] for s in sample])
    assert dev.mean(0).abs().max() < 1e-4 and dev.std(0).min() > 1e-3


def test_later_result_load_rejects_other_files(tmp_path):
    from attnscope.core.errors import AttnscopeError
    from attnscope.later.result import LaterResult

    with pytest.raises(AttnscopeError, match="does not exist"):
        LaterResult.load(tmp_path)
    (tmp_path / "neurons.json").write_text(json.dumps({"circuit": {}}))
    with pytest.raises(AttnscopeError, match="not a later-layer result"):
        LaterResult.load(tmp_path)
    (tmp_path / "neurons.json").write_text(json.dumps({"layer": 1, "schema_version": 0}))
    with pytest.raises(AttnscopeError, match="schema version 0"):
        LaterResult.load(tmp_path)


@pytest.mark.parametrize("args,msg", [(["--layer", "4"], "layer index 4 is out of range"),
                                      (["--layer", "-1"], "layer index -1 is out of range"),
                                      (["--layer", "2", "--eval", "bundled:es_fortunes"], "at least two sources")])
def test_cli_later_bad_inputs(args, msg, monkeypatch, capsys, tmp_path):
    from attnscope.cli.app import main

    monkeypatch.setattr("sys.argv", ["attnscope", "neurons", "demo", "--out", str(tmp_path), *args])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cached_direct_path_matches_a_fresh_one(tiny3):
    from attnscope.later.effective import cached_direct_path, direct_path

    sa = sample_activations(tiny3, _windows(tiny3, 2), [0, 1, 2])
    cached_direct_path(tiny3, 1, sa)
    assert torch.allclose(cached_direct_path(tiny3, 2, sa), direct_path(tiny3, 2, sa.mean_attn_out), atol=1e-5)


def test_unknown_ranking_predictor_is_refused_before_any_work(demo):
    from attnscope.core.errors import AttnscopeError
    from attnscope.later.evaluate import find_later_neurons
    from attnscope.later.method import LaterSettings

    with pytest.raises(AttnscopeError, match="rank_by 'token_mean' is not a ranking predictor"):
        find_later_neurons(demo[0], 1, s=LaterSettings(rank_by="token_mean"))
