"""One self-contained HTML report of a kernel, circuit and neuron analysis.

:func:`write_report` writes ``out_dir/report.html``: figures are embedded as base64 PNG, all CSS and
JavaScript (the package files ``report.css`` and ``report.js``) are inlined and nothing is fetched from the
network, so the file can be mailed, archived or opened offline.  Sections: model and provenance, positional
kernels (figures, a sortable head table and a head explorer that draws any head's offset kernel on log-log
axes), the contextual circuit (head decisions with the criteria each head fails, stated conditions with
measured values, fidelity, denominator stability), the context neurons (summary, figures, one card per
neuron) and the scope of every approximation.  It accepts typed results only.

Layout: ``write.py`` (page assembly), ``sections.py`` (header, kernels, circuit), ``cards.py`` (neurons),
``scope.py`` (scope), ``html.py`` (small helpers and figure captions).
"""

from attnscope.report.html import FIGURE_CAPTIONS
from attnscope.report.write import write_report

__all__ = ["FIGURE_CAPTIONS", "write_report"]
