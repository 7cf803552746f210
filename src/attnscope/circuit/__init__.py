"""The contextual circuit of layer 0: typed results and settings (``result``), shared building blocks
(``parts``: content and positional inputs, extended embeddings, MLP input weights), the query-conditioned form
(``query``), and head detection, calibrated denominators and stated conditions (``build``: ``build_circuit``)."""
