"""Later MLP layers through effective embeddings: the effective-embedding approximation (``effective``), the
layer-by-layer circuit (``method``), the ground truth (``truth``), the hybrid predictor (``context``), the
evaluation (``evaluate``: ``find_later_neurons``) and the typed result (``result``)."""
