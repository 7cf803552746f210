r"""The FastAPI application: one page (package files under ``static/``) and a small JSON API.

Routes (all answers JSON; errors are ``{"error": "what is wrong; how to fix it"}`` with a 4xx status, never a
stack trace; unexpected failures are a 500 with one line, the traceback goes to the server log only):

* ``GET /api/info``: model, circuit (heads, kernels, calibration conditions), explanation kind, scope thresholds.
* ``GET /api/neurons``: the ranked table of every layer-0 neuron.
* ``GET /api/neuron/{k}``: one neuron's row and its top tokens with their scores.
* ``POST /api/analyse`` ``{text, neuron}``: per token, true and predicted pre-activation; the input's conditions.
* ``POST /api/evidence`` ``{text, neuron, position}``: each earlier token's contribution at ``position``.
* ``POST /api/contrast`` ``{text_a, text_b, neuron, top}``: the contrast of two texts.

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

from attnscope.core.errors import AttnscopeError, IndexOutOfRangeError
from attnscope.serve.analysis import MAX_CHARS, EmptyTextError, contrast
from attnscope.serve.scope import ScopeSettings
from attnscope.serve.state import ServeModel
from attnscope.serve.table import SCORE_NAMES

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("attnscope.serve")


class AnalyseRequest(BaseModel):
    text: str
    neuron: int


class EvidenceRequest(AnalyseRequest):
    position: int


class ContrastRequest(BaseModel):
    text_a: str
    text_b: str
    neuron: int
    top: int = Field(default=10)


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
        if isinstance(err, IndexOutOfRangeError):
            return _error(404, str(err))
        if isinstance(err, EmptyTextError):
            return _error(400, str(err))
        return _error(413 if "characters, more than" in str(err) else 400, str(err))

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
            "max_chars": MAX_CHARS, "n_neurons": len(m.table), "score": m.score_name, "score_name": SCORE_NAMES[m.score_name]}


def neuron_json(m: ServeModel, k: int, n: int = 20) -> dict:
    m.analyser.check_neuron(k)
    S = m.explanation.token_scores(k)
    keep = m.circ.token_mask.clone()
    keep[[i for i in m.w.tokenizer.all_special_ids if i < len(keep)]] = False
    ids = torch.nonzero(keep).squeeze(1)
    tok = m.w.tokenizer
    dec = lambda i: tok.convert_tokens_to_string([tok.convert_ids_to_tokens(int(i))])  # noqa: E731
    tp, tn = S[ids].topk(n), (-S[ids]).topk(n)
    row = next(r for r in m.table if r.index == k)
    return {**row.to_json(), "top_positive_scores": [[dec(ids[i]), float(v)] for i, v in zip(tp.indices, tp.values)],
            "top_negative_scores": [[dec(ids[i]), -float(v)] for i, v in zip(tn.indices, tn.values)]}


def _add_api(app: FastAPI, m: ServeModel) -> None:
    info = info_json(m)
    table = [r.to_json() for r in m.table]

    @app.get("/api/info")
    def api_info() -> dict:
        return info

    @app.get("/api/neurons")
    def api_neurons() -> dict:
        return {"neurons": table}

    @app.get("/api/neuron/{k}")
    def api_neuron(k: int) -> dict:
        return neuron_json(m, k)

    @app.post("/api/analyse")
    def api_analyse(req: AnalyseRequest) -> dict:
        m.analyser.check_neuron(req.neuron)
        a = m.analyser.analyse(req.text)
        return {**a.neuron_json(req.neuron), "explanation": m.explanation.kind, "model": m.w.name}

    @app.post("/api/evidence")
    def api_evidence(req: EvidenceRequest) -> dict:
        ev, first = m.analyser.evidence(req.text, req.neuron, req.position)
        bos = 1 if m.analyser.bos is not None else 0
        contrib = ev.contributions.tolist()
        return {"neuron": req.neuron, "position": req.position, "first_token": first, "has_bos": bool(bos),
                "bos_contribution": contrib[0] if bos else None, "contributions": contrib[bos:],
                "kernel": ev.kernel.tolist()[bos:], "scores": ev.scores.tolist()[bos:], "terms": ev.terms,
                "prediction": ev.prediction}

    @app.post("/api/contrast")
    def api_contrast(req: ContrastRequest) -> dict:
        return contrast(m.analyser, req.text_a, req.text_b, req.neuron, req.top)


def create_app(m: ServeModel) -> FastAPI:
    """The web app for one loaded model (see the module docstring for the routes)."""
    app = FastAPI(title="attnscope serve", docs_url=None, redoc_url=None, openapi_url=None)
    _install_error_handlers(app)
    _add_api(app, m)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    return app
