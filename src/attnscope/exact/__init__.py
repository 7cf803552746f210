"""The exact computation from the weights: the forward pass layer by layer (``forward``), checked against the
model's own; the content/position decomposition of attention scores with LayerNorm handled as the method says
(``decomposition``); attention sinks (``sinks``)."""
