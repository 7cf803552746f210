"""Denominator transfer of the circuit as the neuron stage checks it (the first reporting window of each held-out
source), for the circuit's own form and for the typical-query form beside it.

    PYTHONPATH=src python studies/denominator_transfer.py smollm2 all-MiniLM-L6-v2
"""

from __future__ import annotations

import sys

from attnscope.circuit.build import CircuitSettings, build_circuit
from attnscope.models import load_model
from attnscope.neurons.explain import denominator_transfer
from attnscope.neurons.find import NeuronSettings, held_out_windows

for spec in sys.argv[1:]:
    w = load_model(spec)
    for form in ("auto", "off"):
        circ = build_circuit(w, CircuitSettings(query_conditioned=form))
        windows = held_out_windows(w, circ, None, NeuronSettings().max_windows)
        dens = denominator_transfer(w, circ, {x.name: x.report[0] for x in windows})
        name = "query-conditioned" if circ.query_conditioned else "typical query"
        print(f"{spec} ({name}): out of scope " + (", ".join(d.text for d in dens if not d.in_scope) or "none"))
        for d in dens:
            print(f"  {d.text}: Z ratio per head " + " ".join(f"{r:.2f}" for r in d.ratio))
