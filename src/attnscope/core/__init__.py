"""Foundations with no model code: typed errors (``errors``), the on-disk cache and atomic, staged outputs
(``cache``), text sources and tokenisation (``texts``), and small statistics (``stats``)."""
