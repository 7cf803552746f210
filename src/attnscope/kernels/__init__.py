"""Positional kernels of every head of every layer (``analysis``: estimation from sample windows, validation
on held-out windows, the typed :class:`~attnscope.kernels.analysis.KernelResult`) and their categories
(``categories``: sharp local decay / slow decay / uniform, with thresholds)."""
