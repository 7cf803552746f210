"""Neuron stages, through the public steps of ``attnscope.neurons.find`` (score / select / verify / label):
scoring (and the naive one-product way), verification (and the TransformerLens way)."""

from __future__ import annotations

import time

from common import N_VERIFY, _bridge, _circuit, _heads, _load, assert_device, measure


def _settings(cfg):
    """The bench's settings: its held-out texts (two windows each: one tunes, one reports), and
    ``precision_target=0`` so every neuron passes the threshold and the 64 most sensitive get a card: on
    random weights the measured threshold passes ~none, and verification would do no work."""
    from attnscope.neurons.find import NeuronSettings

    return NeuronSettings(eval=cfg["texts"]["eval"], precision_target=0.0, max_neurons=N_VERIFY)


def _inputs(cfg):
    """Model, circuit, settings and held-out windows (tokenised before timing, as a user's run would)."""
    from attnscope.neurons.find import held_out_windows

    w = _load(cfg)
    circ = _circuit(cfg, w)
    s = _settings(cfg)
    return w, circ, s, held_out_windows(w, circ, s.eval, s.max_windows)


def stage_scoring(cfg):
    """``score(w, circ, windows, settings, build_token_model(w, circ))``: the token model (as ``find_neurons``
    builds it before scoring; its time is recorded apart), then every neuron's predicted effect sizes
    (calibration std, one-vs-rest contrasts) and the swings over the whole vocabulary."""
    import torch

    from attnscope.neurons.contrast import build_token_model
    from attnscope.neurons.find import score

    w, circ, s, windows = _inputs(cfg)

    def run():
        t0 = time.perf_counter()
        tm = build_token_model(w, circ)
        t1 = time.perf_counter()
        sc = score(w, circ, windows, s, tm)
        return sc, {"token_model_s": t1 - t0, "score_s": time.perf_counter() - t1}

    def check(sc):
        assert sc.sensitivity.shape == (w.d_mlp,) and sc.predicted_d.shape == (len(windows), w.d_mlp)
        assert torch.isfinite(sc.sensitivity).all() and torch.isfinite(sc.swing_pos).all()
        return {"swing_pos_head": [round(float(x), 5) for x in sc.swing_pos[:4]],
                "sensitivity_max": round(float(sc.sensitivity.max()), 5)}

    with torch.no_grad():
        return measure(run, repeats=2, device=cfg["device"], check=check)


def naive_swings(w, circ, top_m: int):
    """The swings with the whole ``[V', d_mlp]`` score matrix ``Ext' @ W_in'`` in one product, then top-m down
    the vocabulary (what ``neurons.swings`` computes in transposed chunks of 1024 neurons)."""
    from attnscope.neurons.find import swing_inputs

    W, ext, mean_cal = swing_inputs(w, circ)
    S = ext[circ.token_mask] @ W  # [V', d_mlp] in one go
    m = min(top_m, int(circ.token_mask.sum()))
    return S.topk(m, dim=0).values.mean(0) - mean_cal, (-S).topk(m, dim=0).values.mean(0) + mean_cal


def stage_scoring_naive(cfg):
    """``score`` with its swings done the naive way (one product); the other parts through the same public
    functions.  Checked to give ``neurons.swings``'s values."""
    import torch

    from attnscope.neurons.contrast import build_token_model, calibration_std
    from attnscope.neurons.find import predicted_effects, swings

    dev = cfg["device"]
    w, circ, s, windows = _inputs(cfg)

    def run():
        sigma = calibration_std(w, circ).cpu()
        pred = sum(predicted_effects(build_token_model(w, circ), windows, sigma, w.d_vocab).values())
        return pred.abs().max(0).values, naive_swings(w, circ, s.top_m)

    def check(out):
        assert_device(out[1][0], dev, "naive swings")
        ref = swings(w, circ, s.top_m, s.chunk)
        for a, b in zip(out[1], ref):
            torch.testing.assert_close(a.cpu().double(), b, rtol=1e-4, atol=1e-4 * max(1.0, float(b.abs().max())))
        return {"swing_pos_head": [round(float(x), 5) for x in out[1][0][:4]]}

    with torch.no_grad():
        return measure(run, repeats=2, device=dev, check=check)


def verify_steps(w, circ, s, windows, scores, ex, tm):
    """What ``find_neurons`` does after ``score``, through the public steps: true effect sizes on both halves,
    ``select``, ``verify`` (reported and random neurons), and ``label`` from each card's top-50 tokens."""
    import torch

    import attnscope.neurons.find as nm
    from attnscope.neurons.contrast import pre_stats

    t, n_min = {}, circ.settings.min_position
    t0 = time.perf_counter()
    d_tune = nm.one_vs_rest_effects([pre_stats(w, x.tune, n_min) for x in windows])
    d_report = nm.one_vs_rest_effects([pre_stats(w, x.report, n_min) for x in windows])
    t["effects_s"], t0 = time.perf_counter() - t0, time.perf_counter()
    thr = nm.select(scores, d_tune, s.precision_target)
    t["select_s"], t0 = time.perf_counter() - t0, time.perf_counter()
    ver, cards, _ = nm.verify(w, circ, scores, thr, d_report, windows, s, ex)
    t["verify_s"], t0 = time.perf_counter() - t0, time.perf_counter()
    ts = tm.token_scores(torch.tensor(cards, device=w.device))  # [V, k]
    top, bot = ts.topk(50, dim=0).indices.T.tolist(), (-ts).topk(50, dim=0).indices.T.tolist()
    tok = w.tokenizer

    def dec(ids):  # as find_neurons decodes a card's tokens
        return [tok.convert_tokens_to_string([x]) for x in tok.convert_ids_to_tokens(ids)]

    labels = [nm.label(dec(a), dec(b)) for a, b in zip(top, bot)]
    t["label_s"] = time.perf_counter() - t0
    return (ver, cards, labels, ts), t


def stage_verify(cfg):
    """find_neurons after scoring (see ``verify_steps``); scoring, explainer and token model are built untimed."""
    import torch

    from attnscope.neurons.contrast import build_token_model
    from attnscope.neurons.explain import build_explainer
    from attnscope.neurons.find import score

    dev = cfg["device"]
    w, circ, s, windows = _inputs(cfg)
    with torch.no_grad():
        ex = build_explainer(w, circ)
        tm = build_token_model(w, circ, ex)
        scores = score(w, circ, windows, s, tm)

    def check(out):
        ver, cards, labels, ts = out
        assert_device(ts, dev, "token scores")
        assert len(cards) == min(N_VERIFY, w.d_mlp) == len(labels), len(cards)
        assert ver.reported is not None and ver.reported.n_neurons == len(cards)
        assert ver.n_positions > 0 and ver.random.n_neurons == s.n_random
        return {"n_verified": len(cards), "median_r": ver.reported.r, "median_r_random": ver.random.r,
                "fidelity": ver.circuit_fidelity}

    with torch.no_grad():
        return measure(lambda: verify_steps(w, circ, s, windows, scores, ex, tm), repeats=2, device=dev,
                       check=check)


def stage_verify_tl(cfg):
    """A TransformerLens user doing the same checks: ``run_with_cache`` up to layer 0 on every held-out window
    (both halves), the MLP-0 pre-activation of every neuron (for effect sizes), and on the reporting windows
    the chosen heads' summed output (``hook_z @ W_O``) projected on 2 x 64 neurons' input weights (the
    reported and the random ones)."""
    import gc

    import torch

    from attnscope.models import load_hf
    from attnscope.neurons.contrast import source_windows

    dev = cfg["device"]
    w = _load(cfg)
    wins = [source_windows(w, p, cfg["n_ctx"], max_windows=_settings(cfg).max_windows) for p in cfg["texts"]["eval"]]
    tune, report = [x.to(dev) for s in wins for x in s.tune], [x.to(dev) for s in wins for x in s.report]
    del w, wins
    gc.collect()
    hf, tok, _ = load_hf(cfg["folder"])
    hf.to(dev)
    bridge = _bridge(cfg, hf, tok)
    heads = _heads(cfg)
    kept = torch.arange(2 * N_VERIFY, device=dev) % cfg["dims"]["d_mlp"]

    def run():
        moments, outs = [], []
        for j, toks in enumerate(tune + report):
            _, cache = bridge.run_with_cache(toks[None], stop_at_layer=1)
            pre = cache["blocks.0.mlp.hook_pre"][0]  # [pos, d_mlp]
            moments.append(torch.stack([pre.sum(0), (pre * pre).sum(0)]))
            if j >= len(tune):
                z = cache["blocks.0.attn.hook_z"][0]  # [pos, head, d_head]
                y = torch.einsum("phe,hed->pd", z[:, heads], bridge.W_O[0, heads])
                contrib = (y - y.mean(-1, keepdim=True)) @ bridge.W_in[0][:, kept]
                outs.append(torch.stack([contrib, pre[:, kept]]))
            del cache
        return outs, moments

    def check(out):
        assert_device(out[0][0], dev, "baseline verification")
        assert len(out[0]) == len(report) and len(out[1]) == len(tune) + len(report)

    with torch.no_grad():
        return measure(run, repeats=2, device=dev, check=check)
