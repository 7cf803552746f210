"""Positional kernels of every head of every layer: ``result`` (settings, the typed
:class:`~attnscope.kernels.result.KernelResult`), ``estimation`` (estimation from sample windows, validation on
held-out windows), ``records`` (per-head properties), ``categories`` (sharp local decay / slow decay / uniform,
with thresholds) and ``analysis`` (:func:`~attnscope.kernels.analysis.analyse_kernels`: runs them, with the
cache; re-exports the public names)."""
