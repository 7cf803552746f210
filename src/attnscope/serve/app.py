r"""The FastAPI application: one page (package files under ``static/``) and a small JSON API.

Routes (all answers JSON; every error, 404 and 405 included, is ``{"error": "what is wrong; how to fix it"}``
with a 4xx status set by the error's class (:func:`.limits.http_status`), never a stack trace; unexpected
failures are a 500 with one line, the traceback goes to the server log only).  Requests pass the ``Host``
allow-list and the body-size limit first (:class:`.limits.GuardMiddleware`); their model work runs through
one bounded queue (:class:`.limits.WorkQueue`, 429 when full), after the text was tokenised and checked
against the token limit (413):

* ``GET /api/info``: model, circuit (heads, kernels, calibration conditions), explanation kind, scope thresholds.
* ``GET /api/neurons``: the ranked table of every layer-0 neuron.
* ``GET /api/neuron/{k}``: one neuron's row and its top tokens with their scores.
* ``POST /api/analyse`` ``{text, neuron}``: per token, true and predicted pre-activation; the input's conditions.
* ``POST /api/evidence`` ``{text, neuron, position}``: each earlier token's contribution at ``position``.
* ``POST /api/contrast`` ``{text_a, text_b, neuron, top}``: the contrast of two texts.
* ``POST /api/attention`` ``{text, head}``: a contextual head's true attention pattern on the text's first window
  (at most ``MAX_ATTENTION_TOKENS`` tokens) beside its kernel x content reconstruction, and their TV per query.

Nothing a user sends is stored: texts live in the request and, for sharing, in the page's URL fragment.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from attnscope.core.errors import AttnscopeError
from attnscope.core.texts import decode_tokens
from attnscope.neurons.contrast import TOKEN_SCORE_DEFINITION
from attnscope.serve.analysis import Analyser, Tokens, attention_check, contrast
from attnscope.serve.contrast_scope import ServedVerifier, in_flag, verification_json
from attnscope.serve.limits import (
    MAX_ATTENTION_TOKENS,
    MAX_BODY_BYTES,
    MAX_CHARS,
    MAX_TOKENS,
    QUEUE_DEPTH,
    GuardMiddleware,
    HostPolicy,
    WorkQueue,
    http_status,
)
from attnscope.serve.scope import ScopeSettings
from attnscope.serve.state import SCORE_NAMES, ServeModel

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("attnscope.serve")


class AnalyseRequest(BaseModel):
    text: str
    neuron: int


class EvidenceRequest(AnalyseRequest):
    position: int


class AttentionRequest(BaseModel):
    text: str
    head: int


class ContrastRequest(BaseModel):
    text_a: str
    text_b: str
    neuron: int
    top: int = Field(default=10)
    verify: bool = False  # add the like-for-like verification of every neuron (ServedVerifier)


def _error(status: int, msg: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": msg})


def _validation_message(err: RequestValidationError) -> str:
    parts = []
    for e in err.errors()[:3]:
        where = ".".join(str(x) for x in e.get("loc", []) if x != "body") or "request body"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return "invalid request (" + "; ".join(parts) + "); send JSON like {\"text\": \"...\", \"neuron\": 12}"


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, err: RequestValidationError):
        return _error(422, _validation_message(err))

    @app.exception_handler(AttnscopeError)
    async def _user(_req: Request, err: AttnscopeError):
        return _error(http_status(err), " ".join(str(err).split()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(req: Request, err: StarletteHTTPException):
        if err.status_code == 404:
            msg = f"no such page or API route: {req.url.path}; the routes are listed in `attnscope serve`'s docs"
        elif err.status_code == 405:
            msg = f"{req.method} is not allowed on {req.url.path}; see the API routes in docs/serve.md"
        else:
            msg = str(err.detail)
        return _error(err.status_code, msg)

    @app.exception_handler(Exception)
    async def _bug(_req: Request, err: Exception):
        log.exception("internal error")
        return _error(500, f"internal error ({type(err).__name__}); the server log has the details")


def info_json(m: ServeModel) -> dict:
    circ, T = m.circ, m.circ.T
    n_ref = T - 1
    kernels = {f"H{h}": circ.head_kernels[j, n_ref, : n_ref + 1].flip(0).tolist() for j, h in enumerate(circ.heads)}
    kernels["shared"] = circ.kernel[n_ref, : n_ref + 1].flip(0).tolist()
    return {"model": m.w.info(), "source": m.source, "explanation": {"kind": m.explanation.kind,
            "description": m.explanation.description},
            "circuit": {"heads": circ.heads, "context": T, "min_position": circ.settings.min_position,
                        "calibration": circ.settings.calibration, "mlp_scale": circ.mlp_scale,
                        "kernel_query_position": n_ref, "kernels_by_offset": kernels,
                        "decisions": [asdict(d) for d in circ.decisions if d.chosen],
                        "conditions": [asdict(c) for c in circ.conditions],
                        "calibration_sink_mass": m.analyser.cal.sink_mass,
                        "calibration_clipped_share": m.analyser.cal.clipped_share},
            "scope_thresholds": asdict(m.analyser.scope if m.analyser.scope else ScopeSettings()),
            "max_chars": MAX_CHARS, "max_tokens": MAX_TOKENS, "max_attention_tokens": MAX_ATTENTION_TOKENS,
            "max_body_bytes": MAX_BODY_BYTES, "n_neurons": len(m.table), "score": m.score_name,
            "score_name": SCORE_NAMES[m.score_name]}


def neuron_json(m: ServeModel, k: int, n: int = 20) -> dict:
    """One neuron's row and its top tokens by the token score the report's cards show
    (:data:`~attnscope.neurons.contrast.TOKEN_SCORE_DEFINITION`; the same tokens, mask and decoding)."""
    m.analyser.check_neuron(k)
    if m.token_model is not None:
        S = m.token_model.token_scores(torch.tensor([k], device=m.w.device))[:, 0].cpu()
    else:
        S = m.explanation.token_scores(k).cpu()
    keep = m.circ.token_mask.cpu().clone()
    keep[[i for i in m.w.tokenizer.all_special_ids if i < len(keep)]] = False
    S = torch.where(keep, S, torch.zeros_like(S))
    tp, tn = S.topk(n), (-S).topk(n)
    dp, dn = decode_tokens(m.w.tokenizer, tp.indices.tolist()), decode_tokens(m.w.tokenizer, tn.indices.tolist())
    row = next(r for r in m.table if r.index == k)
    return {**m.row_json(row), "score_definition": TOKEN_SCORE_DEFINITION,
            "top_positive_scores": [[t, float(v)] for t, v in zip(dp, tp.values)],
            "top_negative_scores": [[t, -float(v)] for t, v in zip(dn, tn.values)]}


def _contrast_json(an: Analyser, verifier: ServedVerifier, ta: Tokens, tb: Tokens, req: ContrastRequest) -> dict:
    """``/api/contrast``: the served contrast, and with ``verify`` every neuron like for like (issue 19)."""
    d = contrast(an, ta, tb, req.neuron, req.top)
    d["scope"] = [{**c.to_json(), "in_flag": in_flag(c)} for c in verifier.scope(ta.ids, tb.ids)]
    d["out_of_scope"] = any(x["in_flag"] and not x["ok"] for x in d["scope"])
    if req.verify:
        d["verification"] = verification_json(verifier.verify(ta.ids, tb.ids))
    return d


def _add_api(app: FastAPI, m: ServeModel, work: WorkQueue, light: WorkQueue) -> None:
    """Model work goes through ``work`` (one worker, bounded depth); tokenising and the limit checks through
    ``light`` (so a refused text does not wait behind model work)."""
    info = info_json(m)
    table = [m.row_json(r) for r in m.table]
    an = m.analyser
    verifier = ServedVerifier(m.w, m.circ)

    @app.get("/api/info")
    def api_info() -> dict:
        return info

    @app.get("/api/neurons")
    def api_neurons() -> dict:
        return {"neurons": table}

    @app.get("/api/neuron/{k}")
    async def api_neuron(k: int) -> JSONResponse:
        an.check_neuron(k)
        return await work.run(lambda: JSONResponse(neuron_json(m, k)))

    @app.post("/api/analyse")
    async def api_analyse(req: AnalyseRequest) -> JSONResponse:
        an.check_neuron(req.neuron)
        toks = await light.run(an.tokens, req.text)

        def job() -> JSONResponse:
            a = an.analyse(toks, [req.neuron])
            return JSONResponse({**a.neuron_json(req.neuron), "explanation": m.explanation.kind, "model": m.w.name})

        return await work.run(job)

    @app.post("/api/evidence")
    async def api_evidence(req: EvidenceRequest) -> JSONResponse:
        an.check_neuron(req.neuron)
        toks = await light.run(an.tokens, req.text)

        def job() -> JSONResponse:
            ev, first = an.evidence(toks, req.neuron, req.position)
            bos = 1 if an.bos is not None else 0
            contrib = ev.contributions.tolist()
            return JSONResponse({"neuron": req.neuron, "position": req.position, "first_token": first,
                                 "has_bos": bool(bos), "bos_contribution": contrib[0] if bos else None,
                                 "contributions": contrib[bos:], "kernel": ev.kernel.tolist()[bos:],
                                 "scores": ev.scores.tolist()[bos:], "terms": ev.terms, "prediction": ev.prediction})

        return await work.run(job)

    @app.post("/api/attention")
    async def api_attention(req: AttentionRequest) -> JSONResponse:
        toks = await light.run(an.tokens, req.text)
        return await work.run(lambda: JSONResponse(attention_check(an, toks, req.head).to_json()))

    @app.post("/api/contrast")
    async def api_contrast(req: ContrastRequest) -> JSONResponse:
        an.check_neuron(req.neuron)
        ta = await light.run(an.tokens, req.text_a)
        tb = await light.run(an.tokens, req.text_b)
        return await work.run(lambda: JSONResponse(_contrast_json(an, verifier, ta, tb, req)))


def create_app(m: ServeModel, *, host: str = "127.0.0.1", allow_hosts: tuple[str, ...] = (),
               queue_depth: int = QUEUE_DEPTH, max_body: int = MAX_BODY_BYTES):
    """The web app for one loaded model (see the module docstring for the routes), wrapped in the ``Host``
    allow-list and body-size guard (``host``: the address the server listens on; ``allow_hosts``: more names,
    e.g. a reverse proxy's)."""
    app = FastAPI(title="attnscope serve", docs_url=None, redoc_url=None, openapi_url=None)
    work, light = WorkQueue(queue_depth), WorkQueue(2 * queue_depth)
    _install_error_handlers(app)
    _add_api(app, m, work, light)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.state.work, app.state.light = work, light
    return GuardMiddleware(app, HostPolicy(host, allow_hosts), max_body)
