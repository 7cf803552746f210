"""attnscope: positional kernels, contextual heads and context-sensitive neurons from a model's weights.

The public API, one function per stage of the pipeline (each returns a typed result with ``save``/``load``)::

    w    = load_model("demo")                       # models/   -> ModelWeights
    ker  = analyse_kernels(w)                       # kernels/  -> KernelResult
    circ = build_circuit(w)                         # circuit/  -> Circuit
    neu  = find_neurons(w, circ)                    # neurons/  -> NeuronResult
    con  = contrast(w, circ, "bundled:es_fortunes", "bundled:de_fortunes", verify=True)  # -> ContrastResult
    lat  = find_later_neurons(w, 1)                 # later/    -> LaterResult
    run_report(w, "out/")                           # report/   -> OUT/report.html
    evo  = run_evolution(["ckpt-0", "ckpt-1"])      # evolution/ -> EvolutionResult

Names are imported on first use (PEP 562), so ``import attnscope`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> (module, attribute)
_API: dict[str, tuple[str, str]] = {
    "AttnscopeError": ("attnscope.core.errors", "AttnscopeError"),
    "ModelWeights": ("attnscope.models", "ModelWeights"),
    "load_model": ("attnscope.models", "load_model"),
    "KernelSettings": ("attnscope.kernels.result", "KernelSettings"),
    "KernelResult": ("attnscope.kernels.result", "KernelResult"),
    "analyse_kernels": ("attnscope.kernels.analysis", "analyse_kernels"),
    "CircuitSettings": ("attnscope.circuit.result", "CircuitSettings"),
    "Circuit": ("attnscope.circuit.result", "Circuit"),
    "build_circuit": ("attnscope.circuit.build", "build_circuit"),
    "NeuronSettings": ("attnscope.neurons.find", "NeuronSettings"),
    "NeuronResult": ("attnscope.neurons.find", "NeuronResult"),
    "find_neurons": ("attnscope.neurons.find", "find_neurons"),
    "ContrastResult": ("attnscope.neurons.contrast", "ContrastResult"),
    "contrast": ("attnscope.neurons.contrast", "run_contrast"),
    "LaterSettings": ("attnscope.later.method", "LaterSettings"),
    "LaterResult": ("attnscope.later.result", "LaterResult"),
    "find_later_neurons": ("attnscope.later.evaluate", "find_later_neurons"),
    "run_report": ("attnscope.report.pipeline", "run_report"),
    "EvolutionSettings": ("attnscope.evolution.run", "EvolutionSettings"),
    "EvolutionResult": ("attnscope.evolution.run", "EvolutionResult"),
    "run_evolution": ("attnscope.evolution.run", "run_evolution"),
}
__all__ = [
    "AttnscopeError",
    "ModelWeights",
    "load_model",
    "KernelSettings",
    "KernelResult",
    "analyse_kernels",
    "CircuitSettings",
    "Circuit",
    "build_circuit",
    "NeuronSettings",
    "NeuronResult",
    "find_neurons",
    "ContrastResult",
    "contrast",
    "LaterSettings",
    "LaterResult",
    "find_later_neurons",
    "run_report",
    "EvolutionSettings",
    "EvolutionResult",
    "run_evolution",
    "__version__",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from attnscope.circuit.build import build_circuit
    from attnscope.circuit.result import Circuit, CircuitSettings
    from attnscope.core.errors import AttnscopeError
    from attnscope.evolution.run import EvolutionResult, EvolutionSettings, run_evolution
    from attnscope.kernels.analysis import analyse_kernels
    from attnscope.kernels.result import KernelResult, KernelSettings
    from attnscope.later.evaluate import find_later_neurons
    from attnscope.later.method import LaterSettings
    from attnscope.later.result import LaterResult
    from attnscope.models import ModelWeights, load_model
    from attnscope.neurons.contrast import ContrastResult
    from attnscope.neurons.contrast import run_contrast as contrast
    from attnscope.neurons.find import NeuronResult, NeuronSettings, find_neurons
    from attnscope.report.pipeline import run_report


def __getattr__(name: str) -> Any:
    if name in _API:
        module, attr = _API[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'attnscope' has no attribute {name!r}")


assert set(__all__) == {*_API, "__version__"}


def __dir__() -> list[str]:
    return sorted(__all__)
