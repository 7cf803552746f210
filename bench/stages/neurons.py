"""Neuron stages: scoring (and the naive one-product way), verification (and the TransformerLens way)."""

from __future__ import annotations

from common import N_VERIFY, _bridge, _circuit, _heads, _load, assert_device, measure


def stage_scoring(cfg):
    import torch

    from attnscope.neurons import NeuronSettings, score_neurons

    dev = cfg["device"]
    w = _load(cfg)
    circ = _circuit(cfg, w)

    def check(out):
        effect = out[0]
        assert_device(effect, dev, "neuron effects")
        assert effect.shape == (w.d_mlp,)
        assert torch.isfinite(effect).all()
        return {"swing_pos_head": [round(float(x), 5) for x in out[1][:4]]}

    return measure(lambda: score_neurons(w, circ, NeuronSettings(), progress=False), repeats=2, device=dev,
                   check=check)


def stage_scoring_naive(cfg):
    """The naive way: the whole ``[V, d_mlp]`` score matrix ``Ext' @ W_in'`` in one product, then the same top-m
    reductions over the vocabulary (what score_neurons computes in chunks of 1024 neurons)."""
    import torch

    from attnscope.circuit import mlp_input_weights, true_head_output
    from attnscope.decomposition import centre
    from attnscope.neurons import NeuronSettings

    dev = cfg["device"]
    w = _load(cfg)
    circ = _circuit(cfg, w)
    m = NeuronSettings().top_m

    def run():
        W, _ = mlp_input_weights(w)
        ext = centre(circ.ext, w) / circ.mlp_scale
        cal = circ.calibration_tokens.to(dev)
        p_cal = torch.bincount(cal, minlength=w.d_vocab).to(ext.dtype)
        p_cal = p_cal / p_cal.sum()
        _, pre_cal, _ = true_head_output(w, circ.heads, cal)
        std_cal = pre_cal[circ.settings["min_position"]:].std(0) + 1e-6
        S = ext[circ.token_mask] @ W  # [V, d_mlp] in one go
        mean_cal = (p_cal @ ext) @ W
        sw_pos = S.topk(m, dim=0).values.mean(0) - mean_cal
        sw_neg = (-S).topk(m, dim=0).values.mean(0) + mean_cal
        return torch.maximum(sw_pos, sw_neg) / std_cal, sw_pos

    def check(out):
        assert_device(out[0], dev, "naive neuron effects")
        return {"swing_pos_head": [round(float(x), 5) for x in out[1][:4]]}

    with torch.no_grad():
        return measure(run, repeats=2, device=dev, check=check)


def stage_verify(cfg):
    """find_neurons minus scoring: selection, explanation cards and verification on held-out texts."""
    import torch

    import attnscope.neurons as nm

    dev = cfg["device"]
    w = _load(cfg)
    circ = _circuit(cfg, w)
    scored = nm.score_neurons(w, circ, nm.NeuronSettings(), progress=False)
    nm.score_neurons = lambda *a, **k: scored  # time what find_neurons adds to scoring
    s = nm.NeuronSettings(eval=cfg["texts"]["eval"], effect_min=0.0, outlier_z=-1e9, max_neurons=N_VERIFY)

    def check(res):
        assert len(res.records) == min(N_VERIFY, w.d_mlp), len(res.records)
        assert res.fidelity["n_positions"] > 0
        return {"n_verified": len(res.records), "fidelity": res.fidelity}

    with torch.no_grad():
        return measure(lambda: nm.find_neurons(w, circ, s, progress=False), repeats=2, device=dev, check=check)


def stage_verify_tl(cfg):
    """A TransformerLens user verifying the same neurons: run_with_cache up to layer 0 on each held-out text,
    the chosen heads' summed output (hook_z @ W_O) and its projection on the neurons' input weights."""
    import torch

    import attnscope.neurons as nm
    from attnscope.models import load_hf
    from attnscope.texts import text_tokens

    dev = cfg["device"]
    hf, tok, _ = load_hf(cfg["folder"])
    hf.to(dev)
    bridge = _bridge(cfg, hf, tok)
    texts = [text_tokens(p, tok, max_tokens=cfg["n_ctx"]).to(dev) for p in cfg["texts"]["eval"]]
    heads = _heads(cfg)
    kept = torch.arange(N_VERIFY, device=dev) % cfg["dims"]["d_mlp"]
    del nm

    def run():
        outs = []
        for toks in texts:
            _, cache = bridge.run_with_cache(toks[None], stop_at_layer=1)
            z = cache["blocks.0.attn.hook_z"][0]  # [pos, head, d_head]
            y = torch.einsum("phe,hed->pd", z[:, heads], bridge.W_O[0, heads])
            contrib = (y - y.mean(-1, keepdim=True)) @ bridge.W_in[0][:, kept]
            outs.append(torch.stack([contrib, cache["blocks.0.mlp.hook_pre"][0][:, kept]]))
            del cache
        return outs

    def check(outs):
        assert_device(outs[0], dev, "baseline verification")

    with torch.no_grad():
        return measure(run, repeats=2, device=dev, check=check)
