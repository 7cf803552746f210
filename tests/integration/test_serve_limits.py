"""`attnscope serve` on a machine with other users (issue 22, items 7-9): token limits refused before any model
work with the server's memory measured, bounded memory at the token limit, the Host allow-list, one JSON error
format for every status, invalid Unicode, the body-size guard and the bounded queue (429).  Timings are in
bench/serve_latency.py (``--limits``), not here."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from attnscope.core.errors import AttnscopeError, IndexOutOfRangeError  # noqa: E402
from attnscope.serve.limits import (  # noqa: E402
    MAX_TOKENS,
    BodyTooLargeError,
    HostPolicy,
    InvalidTextError,
    QueueFullError,
    TextTooLongError,
    check_allow_host,
    http_status,
)
from attnscope.serve.memory import PeakMemory  # noqa: E402

EMOJI = "\U0001F600"


@pytest.fixture(scope="module")
def served(demo):
    from attnscope.models import load_model
    from attnscope.serve import create_app, load_serve_model

    m = load_serve_model(load_model("demo"), log=lambda *_: None)
    return m, TestClient(create_app(m), base_url="http://localhost", raise_server_exceptions=False)


class _Counter:
    """Counts calls of the model's forward pass and the explanation (the "model work")."""

    def __init__(self, m, monkeypatch):
        import attnscope.serve.analysis as analysis

        self.calls = 0
        real_iter, real_predict = analysis.iter_layers, m.explanation.predict

        def iter_layers(*a, **k):
            self.calls += 1
            return real_iter(*a, **k)

        def predict(*a, **k):
            self.calls += 1
            return real_predict(*a, **k)

        monkeypatch.setattr(analysis, "iter_layers", iter_layers)
        monkeypatch.setattr(m.explanation, "predict", predict)


def _text_of_tokens(w, n: int) -> str:
    """A text of exactly ``n`` tokens: bundled texts joined, decoded, trimmed until it re-tokenises to ``n``."""
    from attnscope.core.texts import bundled_texts, open_source, tokenize

    ids = torch.cat([torch.as_tensor(tokenize(open_source(f"bundled:{b}"), w.tokenizer)) for b in bundled_texts()])
    assert len(ids) > n + 100
    k = n
    for _ in range(200):
        s = w.tokenizer.decode(ids[:k])
        got = len(w.tokenizer(s, add_special_tokens=False)["input_ids"])
        if got == n:
            return s
        k += 1 if got < n else -1
    raise AssertionError("no text of exactly n tokens")


def test_200k_emoji_is_refused_before_model_work_with_memory_measured(served, monkeypatch):
    """The issue's request (200,000 emoji, 2.4 MB of escaped JSON; it took 118.6 s and 6 GB before) is a 413
    naming the token limit; no forward pass or prediction runs, and the server's memory grows by little."""
    m, c = served
    calls = _Counter(m, monkeypatch)
    body = json.dumps({"text": EMOJI * 200_000, "neuron": 0})  # ensure_ascii: \ud83d\ude00 per emoji
    assert 2_300_000 < len(body) < 2_500_000
    with PeakMemory() as mem:
        r = c.post("/api/analyse", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert f"more than {MAX_TOKENS} tokens" in err and "\n" not in err
    assert calls.calls == 0
    assert mem.growth_mb < 100, mem.growth_mb  # was 5,590 MB
    assert len(r.content) < 300  # was 29 MB
    r = c.post("/api/contrast", json={"text_a": "hola", "text_b": EMOJI * 200_000, "neuron": 0})
    assert r.status_code == 413 and f"more than {MAX_TOKENS} tokens" in r.json()["error"] and calls.calls == 0


def test_request_at_the_token_limit_is_answered_with_bounded_memory(served):
    """A text of exactly MAX_TOKENS (16,384) tokens is analysed; the server's peak memory grows by under 200 MB
    (the answer holds per-token values for the chosen neuron only)."""
    m, c = served
    assert MAX_TOKENS >= 16_000
    text = _text_of_tokens(m.w, MAX_TOKENS)
    k = m.table[0].index
    c.post("/api/analyse", json={"text": "warm up " * 40, "neuron": k})
    with PeakMemory() as mem:
        r = c.post("/api/analyse", json={"text": text, "neuron": k})
    assert r.status_code == 200, r.text[:300]
    d = r.json()
    assert d["n_tokens"] == MAX_TOKENS and len(d["true"]) == MAX_TOKENS and len(d["pred"]) == MAX_TOKENS
    assert mem.growth_mb < 200, mem.growth_mb
    assert len(r.content) < 3_000_000
    over = c.post("/api/analyse", json={"text": text + " and more", "neuron": k})
    assert over.status_code == 413 and f"more than {MAX_TOKENS} tokens" in over.json()["error"]


def test_analysis_of_one_neuron_equals_all_neurons(served):
    """Keeping one neuron's column (the bounded path) gives the same numbers as analysing every neuron, and the
    running moments give the contrast the same means and variances as the stored arrays."""
    m, _ = served
    text = _text_of_tokens(m.w, 300)  # two windows
    k = m.table[3].index
    full = m.analyser.analyse(text)
    one = m.analyser.analyse(text, [k], moments=True)
    assert one.true.shape == (300, 1)
    assert torch.allclose(one.true[:, 0], full.true[:, k], atol=1e-5)
    assert torch.allclose(one.pred[:, 0], full.pred[:, k], atol=1e-4)
    keep = ~full.early
    mt, vt, mp, vp, n = one.moments.stats()
    assert n == int(keep.sum())
    assert torch.allclose(mt, full.true[keep].double().mean(0), atol=1e-5)
    assert torch.allclose(vt, full.true[keep].double().var(0), rtol=1e-4, atol=1e-6)
    assert torch.allclose(vp, full.pred[keep].double().var(0), rtol=1e-4, atol=1e-6)
    with pytest.raises(AttnscopeError, match="not analysed"):
        one.neuron_json(k + 1)


@pytest.mark.parametrize("host,ok", [("localhost", True), ("localhost:8000", True), ("127.0.0.1:1234", True),
                                     ("[::1]:8000", True), ("LOCALHOST.", True), ("evil.example.com", False),
                                     ("evil.example.com:8000", False), ("127.0.0.1.evil.example.com", False),
                                     ("", False)])
def test_host_header_allow_list(served, host, ok):
    """DNS rebinding: a page on another name must not reach the API (the issue's `Host: evil.example.com` got
    /api/info with the model's absolute path)."""
    _, c = served
    r = c.get("/api/info", headers={"Host": host})
    if ok:
        assert r.status_code == 200 and "model" in r.json()
    else:
        assert r.status_code == 400 and set(r.json()) == {"error"}
        assert "is not allowed" in r.json()["error"] and "--allow-host" in r.json()["error"]
        assert "path" not in r.text


def test_allow_host_and_listen_address(served):
    from attnscope.serve import create_app

    m, _ = served
    proxy = TestClient(create_app(m, allow_hosts=("attnscope.example.org",)), base_url="http://localhost")
    assert proxy.get("/api/info", headers={"Host": "attnscope.example.org"}).status_code == 200
    assert proxy.get("/api/info", headers={"Host": "evil.example.com"}).status_code == 400
    lan = TestClient(create_app(m, host="192.168.7.9"), base_url="http://localhost")
    assert lan.get("/api/info", headers={"Host": "192.168.7.9:8000"}).status_code == 200
    assert lan.get("/api/info", headers={"Host": "10.0.0.1:8000"}).status_code == 400
    anyaddr = HostPolicy("0.0.0.0")
    assert anyaddr.allows("10.0.0.1:8000") and anyaddr.allows("[fe80::1]:80") and not anyaddr.allows("evil.com")
    assert check_allow_host("Proxy.Example.org.") == "proxy.example.org"
    for bad in ("", "http://x/", "a b", "0.0.0.0"):
        with pytest.raises(AttnscopeError, match="is not a host name"):
            check_allow_host(bad)


@pytest.mark.parametrize("method,path,status,words", [
    ("get", "/no/such/page", 404, "no such page or API route: /no/such/page"),
    ("get", "/static/missing.js", 404, "no such page"),
    ("get", "/api/analyse", 405, "GET is not allowed on /api/analyse"),
    ("post", "/api/info", 405, "POST is not allowed on /api/info"),
    ("delete", "/api/neurons", 405, "DELETE is not allowed"),
])
def test_404_and_405_are_json_errors(served, method, path, status, words):
    _, c = served
    r = getattr(c, method)(path)
    assert r.status_code == status
    assert r.headers["content-type"].startswith("application/json") and set(r.json()) == {"error"}
    assert words in r.json()["error"]


def test_500_is_a_json_error(served, monkeypatch):
    m, c = served
    monkeypatch.setattr(m.analyser, "analyse", lambda *a, **k: 1 / 0)
    r = c.post("/api/analyse", json={"text": "hola", "neuron": 0})
    assert r.status_code == 500 and r.json() == {"error": "internal error (ZeroDivisionError); the server log has the "
                                                          "details"}


@pytest.mark.parametrize("path,body", [
    ("/api/analyse", '{"text": "hola \\ud800 mundo", "neuron": 0}'),
    ("/api/evidence", '{"text": "\\udfff", "neuron": 0, "position": 0}'),
    ("/api/contrast", '{"text_a": "hola", "text_b": "x\\ud83d", "neuron": 0}'),
])
def test_lone_surrogate_is_a_400(served, path, body):
    _, c = served
    r = c.post(path, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert "not valid Unicode" in r.json()["error"] and "lone surrogate" in r.json()["error"]


def test_body_over_the_limit_is_refused_unread(served):
    from attnscope.serve.limits import MAX_BODY_BYTES

    _, c = served
    r = c.post("/api/analyse", content=b"x" * (MAX_BODY_BYTES + 1), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "bytes, more than" in r.json()["error"]


@pytest.mark.parametrize("err,status", [
    (TextTooLongError("no keyword here"), 413), (BodyTooLargeError("x"), 413), (QueueFullError("x"), 429),
    (InvalidTextError("x"), 400), (IndexOutOfRangeError("x"), 404),
    (AttnscopeError("the text has 9 characters, more than 2"), 400),  # the message never decides the status
])
def test_status_follows_the_error_class(err, status):
    assert http_status(err) == status


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def test_full_queue_gets_429(served, monkeypatch):
    """With a queue of depth 1, a second request while the first one's model work runs gets 429 at once; after
    the first finishes, requests are answered again."""
    from attnscope.serve import background_server, create_app

    m, _ = served
    started, release = threading.Event(), threading.Event()
    real = m.analyser.analyse

    def slow(*a, **k):
        started.set()
        assert release.wait(30)
        return real(*a, **k)

    monkeypatch.setattr(m.analyser, "analyse", slow)
    with background_server(create_app(m, queue_depth=1)) as url:
        first: dict = {}
        t = threading.Thread(target=lambda: first.update(r=_post(url + "/api/analyse", {"text": "hola", "neuron": 0})))
        t.start()
        assert started.wait(30)
        status, body = _post(url + "/api/analyse", {"text": "adiós", "neuron": 0})
        assert status == 429 and "busy" in body["error"] and set(body) == {"error"}
        release.set()
        t.join(60)
        assert first["r"][0] == 200
        for _ in range(50):  # the place is freed by the worker's callback, just after the answer
            status, _body = _post(url + "/api/analyse", {"text": "otra vez", "neuron": 0})
            if status != 429:
                break
            time.sleep(0.05)
        assert status == 200


def test_attention_endpoint_checks_the_decomposition_with_its_own_limit(served):
    """/api/attention: the true pattern is the forward pass's, the reconstruction is K_n(i) f(x_i) normalised,
    their TV is recomputed here; a long text is cut to MAX_ATTENTION_TOKENS (its own limit), and only the
    lower triangles travel."""
    from attnscope.exact.forward import iter_layers
    from attnscope.serve.limits import MAX_ATTENTION_TOKENS

    m, c = served
    h = m.circ.heads[0]
    text = _text_of_tokens(m.w, 100)
    r = c.post("/api/attention", json={"text": text, "head": h})
    assert r.status_code == 200, r.text
    d = r.json()
    n = d["n"]
    assert n == 100 and not d["truncated"] and [len(row) for row in d["true"]] == list(range(1, n + 1))
    ids = torch.tensor(m.w.tokenizer(text, add_special_tokens=False)["input_ids"])
    A = next(iter_layers(m.w, ids[None], stop_layer=0)).pattern[0, h].double()
    j = m.circ.heads.index(h)
    R = (m.circ.head_kernels[j, :n, :n] * m.circ.f[j, ids][None, :]).double().tril()
    R = R / R.sum(-1, keepdim=True)
    for q in (0, 30, 99):
        assert d["true"][q] == pytest.approx(A[q, : q + 1].tolist(), abs=1e-4)
        assert d["reconstruction"][q] == pytest.approx(R[q, : q + 1].tolist(), abs=1e-4)
    tv = 0.5 * (A - R).abs().sum(-1)
    assert d["tv"] == pytest.approx(tv.tolist(), abs=2e-4)
    assert d["tv_median"] == pytest.approx(float(tv[m.circ.settings.min_position:].median()), abs=1e-6)
    long = c.post("/api/attention", json={"text": _text_of_tokens(m.w, 2000), "head": h}).json()
    assert long["truncated"] and long["n"] == MAX_ATTENTION_TOKENS and long["n_text_tokens"] == 2000
    not_contextual = next(x for x in range(m.w.n_heads) if x not in m.circ.heads)
    bad = c.post("/api/attention", json={"text": text, "head": not_contextual})
    assert bad.status_code == 404 and "not a contextual head" in bad.json()["error"]
