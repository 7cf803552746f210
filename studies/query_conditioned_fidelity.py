"""Circuit fidelity (FVU on held-out bundled texts) of the typical-query circuit and of the query-conditioned
form (attnscope.circuit.query), with the heads detected by the default criteria (issue 10); also which form
``--query-conditioned auto`` picks and both forms' FVU on the calibration text.

    PYTHONPATH=src python studies/query_conditioned_fidelity.py smollm2 all-MiniLM-L6-v2
"""

from __future__ import annotations

import dataclasses
import sys

from attnscope.circuit.build import CircuitSettings, build_circuit, circuit_fidelity
from attnscope.circuit.query import choose_query_form
from attnscope.core.texts import bundled_texts, text_tokens
from attnscope.models import load_model

for spec in sys.argv[1:]:
    w = load_model(spec)
    auto = build_circuit(w, CircuitSettings())
    typ = build_circuit(w, CircuitSettings(query_conditioned="off"))
    on = choose_query_form(w, dataclasses.replace(typ, settings={**typ.settings, "query_conditioned": "on"},
                                                  conditions=list(typ.conditions)))
    texts = {t: text_tokens(t, w.tokenizer, max_tokens=typ.T, bos_token_id=w.analysis_bos)
             for t in [f"bundled:{t}" for t in bundled_texts() if f"bundled:{t}" != typ.settings.calibration]}
    f_typ, f_qc = circuit_fidelity(w, typ, texts), circuit_fidelity(w, on, texts)
    cal = {k: round(v, 3) for k, v in typ.calibration_fvu.items()}
    print(f"{spec}: heads {typ.heads}; bos {typ.settings.bos}; held-out texts {len(texts)} "
          f"({f_qc['n_positions']} positions); FVU typical-query circuit {f_typ['fvu']:.3f}; "
          f"FVU query-conditioned {f_qc['fvu']:.3f}; calibration-text FVU {cal}; "
          f"auto picks {'query-conditioned' if auto.query_conditioned else 'typical query'}")
