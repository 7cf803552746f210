"""The unseen-text benchmark (issue 19): like-for-like contrast verification and the scope flag, any model.

    python bench/unseen.py MODEL --half dev|report [--windows 16] [--out bench/results/unseen]
                           [--source-aware-denominators] [--per-source-sd] [--query-aware-bag]
                           # all three: the predictor contrast uses (saved as *_srcz_sd_q.json)
    python bench/unseen.py MODEL --half dev|report --signal [--source-aware-denominators]   # predicted-d candidates
    python bench/unseen.py MODEL[,MODEL...] --half dev --calibrate [--source-aware-denominators]
    python bench/unseen.py summary --half dev                 # one row per saved run

Sources, pairs and adversarial inputs: ``bench/unseen/`` (built and frozen by scripts/make_unseen_bench.py;
the report half is never tuned on).  For every source of the half, up to ``--windows`` windows spread over
the whole source are run once through layer 0 (cached under OUT/cache, keyed by the weights' fingerprint, the
circuit settings and the text's sha256).  For every pair of the half (and every adversarial input against
each natural source of the half) it prints and saves:

* like-for-like Spearman (prediction from the verified windows' counts), the whole-source prediction's,
  the noise ceiling (Spearman-Brown), the token-mean predictor (fitted on the bundled texts), the shuffled
  null, R-precision (k = neurons with true |d| >= 1) and that k;
* the scope flag (:mod:`attnscope.serve.contrast_scope`) with the conditions that fail;
* per text, the within-text FVU of the full explanation and its scope verdict;
* the scope flag's AUROC and false-alarm rate against the failure definitions (contrast Spearman < 0.8,
  within-text FVU > 0.5), separately on the natural pairs, the natural texts and the adversarial inputs.

Not a test: demo under a minute, MiniLM about 10 minutes, SmolLM2 about 20-30 minutes (8 windows) on 2 busy
cores; reruns reuse the cached layer-0 measurements.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics as st
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent / "unseen"


def _fmt(x, nd: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and x != x) else f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def to_plain(m) -> dict:
    """A TextMeasure as tensors and plain values (the cache outlives module moves)."""
    d = {k: getattr(m, k) for k in ("n_tokens", "n_windows", "n_positions", "distinct_share", "top_token_share",
                                    "unseen_share", "fvu_within")}
    d["conditions"] = [asdict(c) for c in m.conditions]
    d["stats"] = [(s.n, s.s1, s.s2) for s in m.stats]
    return d


def from_plain(d: dict):
    from attnscope.neurons.verification import PreStats
    from attnscope.serve.input_scope import TextMeasure
    from attnscope.serve.scope import InputCondition

    kw = {k: v for k, v in d.items() if k not in ("conditions", "stats")}
    return TextMeasure(**kw, conditions=[InputCondition(**c) for c in d["conditions"]],
                       stats=[PreStats(*x) for x in d["stats"]])


def measure_all(w, circ, names: list[str], n_windows: int, cache: Path) -> dict:
    """Each text measured once (cached): windows, token frequencies of the whole text, TextMeasure."""
    from attnscope.core.cache import atomic_path, read_or_drop, weights_fingerprint
    from attnscope.core.texts import open_source, tokenize
    from attnscope.neurons.explain import build_explainer
    from attnscope.neurons.verification import spread_windows, token_frequencies
    from attnscope.serve.input_scope import measure_text
    from attnscope.serve.scope import calibration_reference

    ex, cal = build_explainer(w, circ), calibration_reference(w, circ)
    fp = weights_fingerprint(w)
    out = {}
    cache.mkdir(parents=True, exist_ok=True)
    for n in names:
        text = (BENCH / "texts" / f"{n}.txt").read_text(encoding="utf-8")
        ids = torch.as_tensor(tokenize(open_source(str(BENCH / "texts" / f"{n}.txt")), w.tokenizer))
        wins = spread_windows(w, ids, circ.T, n_windows)
        key = _key(fp, asdict(circ.settings), circ.heads, hashlib.sha256(text.encode()).hexdigest(), n_windows, "v1")
        path = cache / f"{n}-{key}.pt"
        m = read_or_drop(path, lambda p: from_plain(torch.load(p))) if path.exists() else None
        if m is None:
            t0 = time.perf_counter()
            m = measure_text(w, circ, ex, cal, wins, len(ids))
            with atomic_path(path) as tmp:
                torch.save(to_plain(m), tmp)
            print(f"  measured {n}: {len(wins)} windows in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        out[n] = {"windows": wins, "p": token_frequencies(ids[None], w.d_vocab), "m": m}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--half", choices=["dev", "report"], required=True)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--token-mean-windows", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("bench/results/unseen"))
    ap.add_argument("--source-aware-denominators", action="store_true",
                    help="predict with each contextual head's denominator estimated from the source's own token "
                    "counts (TokenModel.bag); saved as OUT/MODEL_HALF_srcz.json")
    ap.add_argument("--per-source-sd", action="store_true",
                    help="predicted d over each side's sd predicted from its own token counts (EffectModel, what "
                    "contrast uses), not one calibration std per neuron; saved as OUT/MODEL_HALF[_srcz]_sd.json")
    ap.add_argument("--query-aware-bag", action="store_true",
                    help="with --source-aware-denominators: each query token's own denominator (QueryBag, what "
                    "contrast uses), not one per head (BagHeads); saved as OUT/MODEL_HALF_srcz[_sd]_q.json")
    ap.add_argument("--rescore", action="store_true",
                    help="apply the current scope rule to the saved OUT/MODEL_HALF.json "
                    "(every condition's measured value is saved) and print the tables, without running the model")
    ap.add_argument("--calibrate", action="store_true",
                    help="from the saved dev-half run: each candidate pair condition's AUROC against failure and "
                    "its threshold by the stated rule (contrast_scope.calibrate_threshold)")
    ap.add_argument("--signal", action="store_true",
                    help="add the predicted signal's strength (token counts only) to the saved OUT/MODEL_HALF.json: "
                    "one token-model pass per text of the half, no layer-0 measurement")
    a = ap.parse_args()
    suffix = (("_srcz" if a.source_aware_denominators else "") + ("_sd" if a.per_source_sd else "")
              + ("_q" if a.query_aware_bag else ""))
    if a.model == "summary":  # one row per saved run in OUT
        summary_table([x for h in ("dev", "report") for x in sorted(a.out.glob(f"*_{h}*.json"))
                       if x.stem.endswith((f"_{h}", f"_{h}_srcz", f"_{h}_srcz_sd", f"_{h}_srcz_sd_q"))])
        return
    if a.calibrate:  # MODEL may be a comma-separated list: each model, then all pooled
        calibrate([a.out / f"{m.replace('/', '_')}_dev{suffix}.json" for m in a.model.split(",")])
        return
    if a.signal:
        add_signal(a.model, a.out / f"{a.model.replace('/', '_')}_{a.half}{suffix}.json")
        return
    if a.rescore:
        rescore(a.out / f"{a.model.replace('/', '_')}_{a.half}{suffix}.json")
        return
    torch.set_num_threads(2)
    from attnscope.circuit.build import build_circuit
    from attnscope.models import load_model
    from attnscope.neurons.contrast import build_token_model, effect_model
    from attnscope.neurons.groundtruth import spearman
    from attnscope.neurons.verification import fit_token_mean, token_frequencies, verify_contrast
    from attnscope.serve.contrast_scope import ScopeRule, in_flag, out_of_scope, pair_scope, text_scope

    split = json.loads((BENCH / "split.json").read_text())
    natural = split["halves"][a.half] + split.get("extension", {}).get(a.half, [])  # dev: its extension too
    adv = split["adversarial"][a.half]
    w = load_model(a.model)
    circ = build_circuit(w)
    n_min = circ.settings.min_position
    sd = a.per_source_sd
    em = effect_model(w, circ, build_token_model(w, circ, source_aware_denominators=a.source_aware_denominators,
                                                 query_aware=a.query_aware_bag), sd)
    # the other denominator form, for the scope's robustness to the denominators (token counts only)
    em_other = effect_model(w, circ, build_token_model(
        w, circ, source_aware_denominators=not a.source_aware_denominators), sd)
    t0 = time.perf_counter()
    tmean = fit_token_mean(w, n_min, circ.T, windows_per_text=a.token_mean_windows)
    texts = measure_all(w, circ, natural + list(adv), a.windows, a.out / "cache")
    rule = ScopeRule()
    pairs = [(p["a"], p["b"], ", ".join(p["tags"]), "natural")
             for p in split["pairs"][a.half] + split["pairs"].get(f"{a.half}_extension", [])]
    pairs += [(x, n, adv[x]["kind"], "adversarial") for x in adv for n in natural]
    rows = []
    for x, y, tag, kind in pairs:
        A, B = texts[x], texts[y]
        v, d, _, lfl = verify_contrast(w, em.predict_d, em.sigma, n_min, A["windows"], B["windows"], A["p"], B["p"],
                                       tmean,
                                       A["m"].stats, B["m"].stats, f"up to {a.windows} windows spread over each source")
        pa, pb = (token_frequencies(torch.cat([x.reshape(-1) for x in T["windows"]])[None], w.d_vocab) for T in (A, B))
        other = em_other.predict_d(pa, pb)
        sc = pair_scope(A["m"], B["m"], lfl, rule, other)
        rows.append({"a": x, "b": y, "tags": tag, "kind": kind, "verification": asdict(v),
                     "scope": [{**c.to_json(), "in_flag": in_flag(c)} for c in sc], "out_of_scope": out_of_scope(sc),
                     "rms_predicted_d": float(lfl.pow(2).mean().sqrt()),
                     "denominator_robustness": spearman(lfl, other), "predicted_signal": signal_features(lfl),
                     "denominator_shift": float((other - lfl).pow(2).mean().sqrt() / lfl.pow(2).mean().sqrt()),
                     "failed": not (v.like_for_like.spearman >= 0.8)})
    trows = []
    for n, T in texts.items():
        sc = text_scope(T["m"], rule)
        trows.append({"text": n, "kind": "adversarial" if n in adv else "natural", "n_tokens": T["m"].n_tokens,
                      "n_windows": T["m"].n_windows, "fvu_within": T["m"].fvu_within,
                      "distinct_share": T["m"].distinct_share, "top_token_share": T["m"].top_token_share,
                      "unseen_share": T["m"].unseen_share,
                      "scope": [{**c.to_json(), "in_flag": in_flag(c)} for c in sc],
                      "out_of_scope": out_of_scope(sc),
                      "failed": not (T["m"].fvu_within is not None and T["m"].fvu_within <= 0.5)})
    dt = time.perf_counter() - t0
    res = {"model": w.info(), "half": a.half, "windows": a.windows, "circuit_heads": circ.heads,
           "query_conditioned": circ.query_conditioned,
           "source_aware_denominators": a.source_aware_denominators, "per_source_sd": sd,
           "query_aware_bag": a.query_aware_bag,
           "token_mean_fitted_on": tmean.fitted_on,
           "scope_rule": asdict(rule), "pairs": rows, "texts": trows, "seconds": dt}
    res["summary"] = summarise(rows, trows)
    a.out.mkdir(parents=True, exist_ok=True)
    name = a.model.replace("/", "_")
    (a.out / f"{name}_{a.half}{suffix}.json").write_text(json.dumps(res, indent=1, default=str))
    print_tables(res)


def signal_features(pred_d: torch.Tensor) -> dict:
    """Candidate measures of the predicted contrast's strength and shape (the predicted ``d [d_mlp]``, token
    counts only): the common shift (``|mean| / RMS`` over neurons), counts of neurons at predicted ``|d|`` >= 1
    and 0.5, ``|d|`` at ranks 5-50, quantiles of ``|d|`` and RMS over median ``|d|``."""
    from attnscope.serve.contrast_scope import common_shift_share

    x = pred_d.double().abs().sort(descending=True).values
    return {"common_shift": common_shift_share(pred_d), "n_pred_d_ge_1": int((x >= 1).sum()),
            "n_pred_d_ge_0.5": int((x >= 0.5).sum()),
            "pred_d_rank_5": float(x[4]), "pred_d_rank_10": float(x[9]), "pred_d_rank_20": float(x[19]),
            "pred_d_rank_50": float(x[49]), "median_abs_pred_d": float(x.median()),
            "pred_d_q90": float(x[int(0.1 * len(x))]), "pred_d_q75": float(x[int(0.25 * len(x))]),
            "rms_over_median": float(x.pow(2).mean().sqrt() / x.median().clamp_min(1e-12))}


@torch.no_grad()
def add_signal(model: str, path: Path) -> None:
    """``--signal``: the like-for-like predicted ``d`` of every saved pair again, and its strength."""
    from attnscope.circuit.build import build_circuit
    from attnscope.core.texts import open_source, tokenize
    from attnscope.models import load_model
    from attnscope.neurons.contrast import build_token_model, effect_model
    from attnscope.neurons.verification import spread_windows, token_frequencies

    torch.set_num_threads(2)
    res = json.loads(path.read_text())
    n_windows, source_aware = res["windows"], res["source_aware_denominators"]
    w = load_model(model)
    circ = build_circuit(w)
    em = effect_model(w, circ, build_token_model(w, circ, source_aware_denominators=source_aware,
                                                 query_aware=res.get("query_aware_bag", False)),
                      res.get("per_source_sd", False))
    names = sorted({n for r in res["pairs"] for n in (r["a"], r["b"])})
    P = {}
    for n in names:
        ids = torch.as_tensor(tokenize(open_source(str(BENCH / "texts" / f"{n}.txt")), w.tokenizer))
        wins = spread_windows(w, ids, circ.T, n_windows)
        P[n] = token_frequencies(torch.cat([x.reshape(-1) for x in wins])[None], w.d_vocab)
    vec = {}
    for r in res["pairs"]:
        d = em.predict_d(P[r["a"]], P[r["b"]])
        r["predicted_signal"] = signal_features(d)
        assert abs(float(d.pow(2).mean().sqrt()) - r["rms_predicted_d"]) < 1e-4 * r["rms_predicted_d"], r["a"]
        vec[f"{r['a']}|{r['b']}"] = d.float()
    path.write_text(json.dumps(res, indent=1, default=str))
    (path.parent / "cache").mkdir(exist_ok=True)
    torch.save(vec, path.parent / "cache" / f"{path.stem}_predicted_d.pt")
    print(f"{path}: predicted signal added to {len(res['pairs'])} pairs")


def rescore(path: Path) -> None:
    """The saved run's flags recomputed with the current ScopeRule from the saved measured values."""
    from attnscope.serve.contrast_scope import (
        ScopeRule,
        common_shift,
        denominator_gap,
        denominator_robustness,
        in_flag,
        recheck,
    )

    res = json.loads(path.read_text())
    rule = ScopeRule()
    z = {t["text"]: next((c["measured"] for c in t["scope"] if c["name"] == "denominators as on calibration"), None)
         for t in res["texts"]}
    for r in res["pairs"]:
        r["scope"] = [c for c in r["scope"] if c["name"] not in ("contrast strong enough", "robust to the denominators",
                                                                   "denominators alike on both sides",
                                                                   "not a common shift")]
        if "predicted_signal" in r:
            c = common_shift(r["predicted_signal"]["common_shift"], rule)
            r["scope"].append({**c.to_json(), "in_flag": in_flag(c)})
        if r.get("denominator_robustness") is not None:
            c = denominator_robustness(r["denominator_robustness"], rule)
            r["scope"].append({**c.to_json(), "in_flag": in_flag(c)})
        if z.get(r["a"]) is not None and z.get(r["b"]) is not None:
            c = denominator_gap(z[r["a"]], z[r["b"]], r["rms_predicted_d"], rule)
            r["scope"].append({**c.to_json(), "in_flag": in_flag(c)})
    for r in res["pairs"] + res["texts"]:
        r["scope"] = [recheck(c, rule) for c in r["scope"]]
        r["out_of_scope"] = any(c["in_flag"] and not c["ok"] for c in r["scope"])
    res["scope_rule"] = asdict(rule)
    res["summary"] = summarise(res["pairs"], res["texts"])
    path.write_text(json.dumps(res, indent=1, default=str))
    print_tables(res)


#: candidate pair conditions: name -> (value from a saved pair row, sign: +1 when larger is better)
def _measured(name: str):
    return lambda r: next((c["measured"] for c in r["scope"] if c["name"] == name), None)


def _signal(name: str):
    return lambda r: r.get("predicted_signal", {}).get(name)


PAIR_FEATURES = {
    "not a common shift": (_signal("common_shift"), -1),
    "neurons at predicted |d| >= 1": (_signal("n_pred_d_ge_1"), 1),
    "neurons at predicted |d| >= 0.5": (_signal("n_pred_d_ge_0.5"), 1),
    "predicted |d| at rank 10": (_signal("pred_d_rank_10"), 1),
    "predicted |d| at rank 50": (_signal("pred_d_rank_50"), 1),
    "median predicted |d|": (_signal("median_abs_pred_d"), 1),
    "RMS over median predicted |d|": (_signal("rms_over_median"), 1),
    "denominators alike on both sides": (_measured("denominators alike on both sides"), -1),
    "robust to the denominators": (lambda r: r.get("denominator_robustness"), 1),
    "denominator shift": (lambda r: r.get("denominator_shift"), -1),
    "RMS predicted d": (lambda r: r.get("rms_predicted_d"), 1),
    "enough positions": (_measured("enough positions"), 1),
}


def calibrate(paths: list[Path]) -> None:
    """Each candidate pair condition on the dev half: AUROC of its value against failure (natural pairs;
    adversarial pairs), and the threshold the stated rule gives on the natural pairs; per saved run, then pooled."""
    runs = [json.loads(p.read_text()) for p in paths]
    assert all(r["half"] == "dev" for r in runs), "thresholds are set on the development half only"
    for res in runs:
        _calibrate_table(res["model"]["name"], res["pairs"])
    if len(runs) > 1:
        _calibrate_table(" + ".join(r["model"]["name"] for r in runs), [x for r in runs for x in r["pairs"]])


def _calibrate_table(title: str, pairs: list[dict]) -> None:
    from attnscope.serve.contrast_scope import calibrate_threshold

    print(f"\n{title}, dev half\n\n| condition | AUROC natural | AUROC adversarial | "
          "threshold (rule) | natural: flagged failing / holding | adversarial: flagged failing / holding |\n"
          "|---|---|---|---|---|---|")
    for name, (get, sign) in PAIR_FEATURES.items():
        row = [name]
        sets = {k: [(sign * get(r), r["failed"]) for r in pairs if r["kind"] == k and get(r) is not None]
                for k in ("natural", "adversarial")}
        row += [_fmt(_auroc([-x for x, _ in v], [f for _, f in v])) for v in sets.values()]
        nat = sets["natural"]
        t = calibrate_threshold([x for x, _ in nat], [f for _, f in nat]) if nat else float("nan")
        row.append(f"{'≥' if sign > 0 else '≤'} {_fmt(sign * t, 4)}")
        for v in sets.values():
            row.append(f"{sum(x < t and f for x, f in v)} of {sum(f for _, f in v)} / "
                       f"{sum(x < t and not f for x, f in v)} of {sum(not f for _, f in v)}")
        print("| " + " | ".join(row) + " |")


def summary_table(paths: list[Path]) -> None:
    """``bench/unseen.py summary``: the headline numbers of every saved run, one row each (scope as saved: rescore
    a run first to apply the current rule)."""
    print("| model | half | denominators | windows | s | like for like | whole source | noise ceiling | token-mean | "
          "shuffled | beats token-mean | pairs < 0.8 | R-precision (pairs ≥ 10 at \\|d\\|≥1: n, median, min, ≥ 0.75) | "
          "scope natural pairs: AUROC, false alarms | scope adversarial: AUROC, false alarms |\n" + "|---" * 15 + "|")
    for p in paths:
        r = json.loads(p.read_text())
        if "summary" not in r or r["half"] not in ("dev", "report"):
            continue
        s = r["summary"]
        rp = s["r_precision_pairs_10plus"]
        nat = [x for x in r["pairs"] if x["kind"] == "natural"]
        sn, sa = s["scope_natural_pairs"], s["scope_adversarial"]
        print(f"| {r['model']['name']} | {r['half']} | "
              f"{'source-aware' if r.get('source_aware_denominators') else 'calibrated'}"
              f"{', per query' if r.get('query_aware_bag') else ''}"
              f"{', per-source sd' if r.get('per_source_sd') else ''} | {r['windows']} | "
              f"{r['seconds']:.0f} | {_fmt(s['median_like_for_like'])} | {_fmt(s['median_whole_source'])} | "
              f"{_fmt(s['median_noise_ceiling'])} | {_fmt(s['median_token_mean'])} | {_fmt(s['median_shuffled'])} | "
              f"{s['beats_token_mean']} of {s['n_pairs']} | {sum(x['failed'] for x in nat)} | "
              f"{len(rp)}, {_fmt(st.median(rp) if rp else None, 2)}, {_fmt(min(rp) if rp else None, 2)}, "
              f"{sum(x >= 0.75 for x in rp)} | {_fmt(sn['auroc'])}, {_fmt(sn['false_alarm_rate'], 2)} | "
              f"{_fmt(sa['auroc'])}, {_fmt(sa['false_alarm_rate'], 2)} |")


def _auroc(score: list[float], bad: list[bool]) -> float | None:
    pos = [s for s, b in zip(score, bad) if b]
    neg = [s for s, b in zip(score, bad) if not b]
    if not pos or not neg:
        return None
    return sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))


def _flag_stats(items: list[dict]) -> dict:
    """AUROC of the out-of-scope flag against failure, its false-alarm rate and its hit rate."""
    bad = [r["failed"] for r in items]
    flag = [float(r["out_of_scope"]) for r in items]
    good = [f for f, b in zip(flag, bad) if not b]
    hit = [f for f, b in zip(flag, bad) if b]
    return {"n": len(items), "n_failed": sum(bad), "auroc": _auroc(flag, bad),
            "false_alarm_rate": sum(good) / len(good) if good else None,
            "hit_rate": sum(hit) / len(hit) if hit else None}


def summarise(rows: list[dict], trows: list[dict]) -> dict:
    nat = [r for r in rows if r["kind"] == "natural"]
    v = [r["verification"] for r in nat]
    med = lambda f: st.median([f(x) for x in v]) if v else None  # noqa: E731
    return {"median_like_for_like": med(lambda x: x["like_for_like"]["spearman"]),
            "median_whole_source": med(lambda x: x["whole_source"]["spearman"]),
            "median_noise_ceiling": med(lambda x: (x["noise_ceiling"] or {}).get("spearman_brown", float("nan"))),
            "median_token_mean": med(lambda x: x["token_mean"]["spearman"]),
            "median_shuffled": med(lambda x: x["shuffled_null"]["spearman"]),
            "beats_token_mean": sum(x["like_for_like"]["spearman"] > x["token_mean"]["spearman"] for x in v),
            "n_pairs": len(v),
            "r_precision_pairs_10plus": [x["like_for_like"]["r_precision"] for x in v if x["n_true"] >= 10],
            "scope_natural_pairs": _flag_stats(nat),
            "scope_natural_texts": _flag_stats([t for t in trows if t["kind"] == "natural"]),
            "scope_adversarial": _flag_stats([r for r in rows if r["kind"] == "adversarial"]
                                             + [t for t in trows if t["kind"] == "adversarial"])}


def print_tables(res: dict) -> None:
    srcz = ", source-aware denominators" if res.get("source_aware_denominators") else ""
    print(f"model {res['model']['name']}{srcz}, {res['half']} half, up to {res['windows']} windows per source; "
          f"contextual heads {res['circuit_heads']}; token-mean fitted on {len(res['token_mean_fitted_on'])} "
          f"bundled texts; {res['seconds']:.0f} s\n")
    print("| pair | tags | like for like ρ | whole source ρ | noise ceiling (S-B) | token-mean ρ | shuffled ρ | "
          "R-precision | R-prec. split half | n \\|d\\|≥1 | scope |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for r in res["pairs"]:
        if r["kind"] != "natural":
            continue
        v = r["verification"]
        nc = (v["noise_ceiling"] or {}).get("spearman_brown")
        fails = [c["name"] for c in r["scope"] if not c["ok"] and c["in_flag"]]
        print(f"| {r['a']} vs {r['b']} | {r['tags']} | {_fmt(v['like_for_like']['spearman'])} | "
              f"{_fmt(v['whole_source']['spearman'])} | {_fmt(nc)} | {_fmt(v['token_mean']['spearman'])} | "
              f"{_fmt(v['shuffled_null']['spearman'])} | {_fmt(v['like_for_like']['r_precision'], 2)} | "
              f"{_fmt((v['noise_ceiling'] or {}).get('r_precision'), 2)} | {v['n_true']} | "
              f"{'out: ' + ', '.join(fails) if fails else 'in'} |")
    s = res["summary"]
    rp = s["r_precision_pairs_10plus"]
    print(f"\nmedians over {s['n_pairs']} natural pairs: like for like {_fmt(s['median_like_for_like'])}, whole source "
          f"{_fmt(s['median_whole_source'])}, noise ceiling {_fmt(s['median_noise_ceiling'])}, token-mean "
          f"{_fmt(s['median_token_mean'])}, shuffled {_fmt(s['median_shuffled'])}; beats token-mean on "
          f"{s['beats_token_mean']} of {s['n_pairs']}; R-precision on the {len(rp)} pairs with >= 10 neurons at "
          f"|d| >= 1: min {_fmt(min(rp) if rp else None, 2)}, median {_fmt(st.median(rp) if rp else None, 2)}\n")
    print("| text | kind | tokens | windows | within-text FVU | distinct | top token | unseen by calibration | scope |"
          "\n|---|---|---|---|---|---|---|---|---|")
    for t in res["texts"]:
        fails = [f"{c['name']} {_fmt(c['measured'])} (threshold {_fmt(c['threshold'])})" for c in t["scope"]
                 if not c["ok"] and c["in_flag"]]
        print(f"| {t['text']} | {t['kind']} | {t['n_tokens']} | {t['n_windows']} | {_fmt(t['fvu_within'])} | "
              f"{_fmt(t['distinct_share'], 2)} | {_fmt(t['top_token_share'], 2)} | {_fmt(t['unseen_share'], 2)} | "
              f"{'out: ' + '; '.join(fails) if fails else 'in'} |")
    print("\n| scope flag | inputs | failing | AUROC | false-alarm rate | hit rate |\n|---|---|---|---|---|---|")
    for k in ("scope_natural_pairs", "scope_natural_texts", "scope_adversarial"):
        f = s[k]
        print(f"| {k[6:].replace('_', ' ')} | {f['n']} | {f['n_failed']} | {_fmt(f['auroc'])} | "
              f"{_fmt(f['false_alarm_rate'], 2)} | {_fmt(f['hit_rate'], 2)} |")
    adv = [r for r in res["pairs"] if r["kind"] == "adversarial"]
    if adv:
        print("\n| adversarial input | kind | median like for like ρ over its pairs | pairs failing | pairs flagged |"
              "\n|---|---|---|---|---|")
        for x in dict.fromkeys(r["a"] for r in adv):
            rr = [r for r in adv if r["a"] == x]
            rho = _fmt(st.median(r["verification"]["like_for_like"]["spearman"] for r in rr))
            print(f"| {x} | {rr[0]['tags']} | {rho}"
                  f" | {sum(r['failed'] for r in rr)} of {len(rr)} | {sum(r['out_of_scope'] for r in rr)} |")


if __name__ == "__main__":
    main()
