#!/usr/bin/env python
"""Latency of `attnscope serve`: real HTTP requests to a uvicorn server holding the model, for a 256-token text.

    .venv/bin/python bench/serve_latency.py [--model demo] [--heads 0,1] [--n-ctx 512] [--repeats 20] [--threads 2]

Times, per endpoint, the wall-clock round trip (client to server and back, JSON included) after two warm-up
calls, and prints the median, 90th percentile and maximum, with the share of the CPUs other processes used
during the timing (the machine is shared).  ``--heads`` forces the contextual heads, as
`attnscope neurons MODEL --heads ... --out DIR` followed by `attnscope serve MODEL --analysis DIR` would;
``--skip-neurons`` leaves out find_neurons, whose table no timed request reads (start-up is then not comparable).

``--limits`` adds the limits of issue 22: the 200,000-emoji request (refused with 413), a text of exactly
``MAX_TOKENS`` tokens (answered), each timed over ``--repeats`` requests, with the peak growth of the process's
resident memory during one request (the server runs in this process: ``attnscope.serve.memory.PeakMemory``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_jiffies  # noqa: E402


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)


def _status(url: str, body: dict) -> int:
    import urllib.error

    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        e.read()
        return e.code


def _limits(url: str, w, k: int, repeats: int) -> dict:
    """The 200,000-emoji request and a request at the token limit: time, status and peak memory growth."""
    from attnscope.serve.limits import MAX_TOKENS
    from attnscope.serve.memory import PeakMemory

    out = {}
    cases = {"emoji_200k": {"text": "\U0001F600" * 200_000, "neuron": k},
             f"at_limit_{MAX_TOKENS}_tokens": {"text": _joined_text(w, MAX_TOKENS), "neuron": k}}
    for name, body in cases.items():
        with PeakMemory() as mem:
            status = _status(url + "/api/analyse", body)
        res = _time(lambda b=body: _status(url + "/api/analyse", b), repeats)
        out[name] = {"status": status, "peak_rss_growth_mb": round(mem.growth_mb, 1), "memory_method": mem.method,
                     "request_bytes": len(json.dumps(body)), **res}
    return out


def _exact_tokens(w, ids: torch.Tensor, n: int) -> str:
    """The decoded prefix of ``ids`` that re-tokenises to exactly ``n`` tokens."""
    k = n
    while True:
        s = w.tokenizer.decode(ids[:k])
        m = len(w.tokenizer(s, add_special_tokens=False)["input_ids"])
        if m == n:
            return s
        k += 1 if m < n else -1


def _joined_text(w, n: int) -> str:
    """A text of exactly ``n`` tokens from the bundled texts joined (longer than any one of them)."""
    from attnscope.core.texts import bundled_texts, open_source, tokenize

    ids = torch.cat([torch.as_tensor(tokenize(open_source(f"bundled:{b}"), w.tokenizer)) for b in bundled_texts()])
    return _exact_tokens(w, ids, n)


def _text(w, spec: str, n: int) -> str:
    """A string of exactly ``n`` tokens: the start of a bundled text, decoded, trimmed until it re-tokenises to n."""
    from attnscope.core.texts import open_source, tokenize

    ids = torch.as_tensor(tokenize(open_source(spec), w.tokenizer))
    return _exact_tokens(w, ids, n)


def _time(fn, repeats: int) -> dict:
    for _ in range(2):
        fn()
    hz, ncpu = os.sysconf("SC_CLK_TCK"), os.cpu_count() or 1
    b0, _ = cpu_jiffies()
    st0 = os.times()
    w0 = time.perf_counter()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    span = time.perf_counter() - w0
    b1, _ = cpu_jiffies()
    st1 = os.times()
    own = (st1.user - st0.user) + (st1.system - st0.system)
    foreign = max(0.0, (b1 - b0) / hz - own) / (span * ncpu)
    ts.sort()
    return {"median_s": statistics.median(ts), "p90_s": ts[int(0.9 * (len(ts) - 1))], "max_s": ts[-1],
            "n": repeats, "foreign_cpu_share": foreign}


def _without_table(w, circ):
    """What the server holds, minus the neuron table (no request but /api/neuron reads it)."""
    from attnscope.serve.analysis import Analyser
    from attnscope.serve.explanation import make_explanation
    from attnscope.serve.scope import calibration_reference
    from attnscope.serve.state import ServeModel

    expl = make_explanation(w, circ)
    return ServeModel(w, circ, expl, Analyser(w, circ, expl, calibration_reference(w, circ)), None,
                      "benchmark: no neuron table")


def _serve_model(w, heads: str | None, n_ctx: int | None, skip_neurons: bool):
    from attnscope.circuit.build import CircuitSettings, build_circuit
    from attnscope.neurons.find import find_neurons
    from attnscope.serve import load_serve_model

    if heads is None and n_ctx is None and not skip_neurons:
        return load_serve_model(w, log=print)
    s = CircuitSettings(n_ctx=n_ctx, heads=[int(h) for h in heads.split(",")] if heads else None)
    circ = build_circuit(w, s)
    if skip_neurons:
        return _without_table(w, circ)
    out = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    find_neurons(w, circ, progress=False).save(out / "neurons")
    return load_serve_model(w, out, log=print)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--heads", default=None, help="force the contextual heads, e.g. 5 or 1,5")
    ap.add_argument("--n-ctx", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limits", action="store_true", help="also time the 413 for 200,000 emoji and a request at "
                    "the token limit, with peak memory")
    ap.add_argument("--skip-neurons", action="store_true",
                    help="do not run find_neurons (the neuron table is in no timed request's path); neuron 0 is timed")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from attnscope.models import load_model
    from attnscope.serve import background_server, create_app

    t0 = time.perf_counter()
    w = load_model(a.model)
    m = _serve_model(w, a.heads, a.n_ctx, a.skip_neurons)
    startup = time.perf_counter() - t0
    text = _text(w, "bundled:es_fortunes", a.tokens)
    other = _text(w, "bundled:en_speeches_1900_2016", a.tokens)
    k = m.table[0].index if m.table else 0  # --skip-neurons: no table, neuron 0
    res = {"model": a.model, "heads": m.circ.heads, "context": m.circ.T, "tokens": a.tokens, "torch_threads": a.threads,
           "cpus": os.cpu_count(), "startup_s": startup, "explanation": m.explanation.kind, "neuron": k,
           "skip_neurons": a.skip_neurons}
    with background_server(create_app(m)) as url:
        d = _post(url + "/api/analyse", {"text": text, "neuron": k})
        res["windows"] = len(d["windows"])
        res["analyse"] = _time(lambda: _post(url + "/api/analyse", {"text": text, "neuron": k}), a.repeats)
        res["evidence"] = _time(lambda: _post(url + "/api/evidence", {"text": text, "neuron": k,
                                                                      "position": a.tokens - 1}), a.repeats)
        res["contrast"] = _time(lambda: _post(url + "/api/contrast", {"text_a": text, "text_b": other,
                                                                      "neuron": k}), a.repeats)
        if a.limits:
            res["limits"] = _limits(url, w, k, max(3, a.repeats // 4))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
