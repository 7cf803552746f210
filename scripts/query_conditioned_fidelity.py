"""Circuit fidelity (FVU on held-out bundled texts) of the typical-query circuit and of the query-conditioned
variant (attnscope.circuit_query), with the heads detected by the default criteria (issue 10).

    PYTHONPATH=src python scripts/query_conditioned_fidelity.py smollm2 all-MiniLM-L6-v2
"""

from __future__ import annotations

import sys

from attnscope.circuit import CircuitSettings, build_circuit, circuit_fidelity
from attnscope.circuit_query import query_conditioned_fidelity
from attnscope.models import load_model
from attnscope.texts import bundled_texts
from attnscope.texts import text_tokens

for spec in sys.argv[1:]:
    w = load_model(spec)
    circ = build_circuit(w, CircuitSettings())
    texts = {t: text_tokens(t, w.tokenizer, max_tokens=circ.T, bos_token_id=w.analysis_bos)
             for t in [f"bundled:{t}" for t in bundled_texts() if f"bundled:{t}" != circ.settings["calibration"]]}
    typ = circuit_fidelity(w, circ, texts)
    qc = query_conditioned_fidelity(w, circ, texts)
    print(f"{spec}: heads {circ.heads}; bos {circ.settings['bos']}; held-out texts {len(texts)} "
          f"({qc['n_positions']} positions); FVU typical-query circuit {typ['fvu']:.3f}; "
          f"FVU query-conditioned {qc['fvu']:.3f}")
