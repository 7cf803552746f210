"""The layout contract (issue 20): stage packages in a fixed order, no import cycles, no private names used
across modules, and no imports inside functions except the listed lazy ones.

The order of the layers, lowest first; a module may import only from its own package or from packages listed
before its own.  ``attnscope/__init__.py`` (the lazy public facade) is outside the layers."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "attnscope"

LAYERS = [
    "core",       # errors, cache, text sources, statistics: no model code
    "models",     # loading: hub ids, local folders, .gguf, packages -> ModelWeights
    "training",   # the demo model's corpora and training loop
    "exact",      # exact forward pass from the weights, the content/position decomposition, sinks
    "kernels",    # positional kernels of every head, categories
    "circuit",    # contextual heads, denominators, the linear summary (typical or query-conditioned)
    "neurons",    # layer-0 neurons: evidence types, scores, explanation, contrast, labels, evaluation, probe
    "later",      # later MLP layers through effective embeddings
    "report",     # figures, the HTML report, the report pipeline
    "evolution",  # training dynamics over checkpoints (its page reuses the report's HTML helpers)
    "serve",      # the local page
    "cli",        # the command line
]
#: imports inside functions that are allowed, with the reason: (importing module, imported module prefix)
LAZY_ALLOWED = {
    ("attnscope.cli", "attnscope.cli.app"): "start-up speed and a clean Ctrl-C before torch is imported",
    ("attnscope", "attnscope."): "the public facade is lazy so that `import attnscope` does not import torch",
    ("attnscope.serve", "attnscope.serve.app"): "FastAPI and uvicorn are the optional `[serve]` extra",
    ("attnscope.serve", "attnscope.serve.state"): "FastAPI and uvicorn are the optional `[serve]` extra",
}
#: third-party modules that may be imported inside functions: optional or heavy dependencies
LAZY_THIRD_PARTY = ("torch", "matplotlib", "ray", "selenium", "fastapi", "uvicorn", "starlette", "transformers",
                    "transformer_lens", "datasets", "gguf", "accelerate", "huggingface_hub", "safetensors", "scipy",
                    "PIL", "tqdm", "rich")


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(SRC.rglob("*.py")):
        rel = p.relative_to(SRC.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _imports(path: Path, mod: str):
    """``(imported module, names, inside_function, lineno)`` for every attnscope or third-party import."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    parents: dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
        for ch in ast.iter_child_nodes(node):
            parents[ch] = node

    def in_function(node) -> bool:
        while node in parents:
            node = parents[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                return True
        return False

    def type_checking_only(node) -> bool:
        while node in parents:
            node = parents[node]
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                return True
        return False

    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and type_checking_only(node):
            continue  # annotations only: never executed
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            # `from attnscope.x import y` where y is a module
            for n in names:
                if f"{target}.{n}" in MODULES:
                    yield f"{target}.{n}", [], in_function(node), node.lineno
            yield target, names, in_function(node), node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], in_function(node), node.lineno


def _graph() -> dict[str, set[str]]:
    g: dict[str, set[str]] = defaultdict(set)
    for mod, path in MODULES.items():
        for target, _, inside, _ in _imports(path, mod):
            if target in MODULES and target != mod and not inside:
                g[mod].add(target)
    return g


def _stage(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else None


def test_top_level_has_at_most_14_entries():
    entries = [p.name for p in SRC.iterdir() if p.name != "__pycache__"]
    assert len(entries) <= 14, sorted(entries)
    stages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert stages == set(LAYERS), stages ^ set(LAYERS)


def test_layers_contract():
    bad = []
    for mod, deps in _graph().items():
        s = _stage(mod)
        if s is None:
            continue
        for dep in deps:
            t = _stage(dep)
            if t is not None and LAYERS.index(t) > LAYERS.index(s):
                bad.append(f"{mod} (layer {s}) imports {dep} (layer {t}, above it)")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    g = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_no_imports_inside_functions_without_a_reason():
    bad = []
    for mod, path in MODULES.items():
        for target, _, inside, line in _imports(path, mod):
            if not inside:
                continue
            if target.split(".")[0] in LAZY_THIRD_PARTY:
                continue
            if any(mod == a and target.startswith(b) for a, b in LAZY_ALLOWED):
                continue
            bad.append(f"{path.relative_to(SRC.parent)}:{line}: import of {target} inside a function")
    assert not bad, f"{len(bad)} imports inside functions:\n" + "\n".join(bad)


def test_no_private_names_across_modules():
    bad = []
    for mod, path in MODULES.items():
        for target, names, _, line in _imports(path, mod):
            if target.startswith("attnscope") and target != mod:
                for n in names:
                    if n.startswith("_") and not n.startswith("__"):
                        bad.append(f"{path.relative_to(SRC.parent)}:{line}: {n} from {target}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("name", ["load_model", "analyse_kernels", "build_circuit", "find_neurons", "contrast",
                                  "find_later_neurons", "run_report", "KernelResult", "Circuit", "NeuronResult",
                                  "ContrastResult", "LaterResult", "EvolutionResult"])
def test_public_facade(name):
    import attnscope

    assert name in attnscope.__all__
    assert getattr(attnscope, name) is not None
