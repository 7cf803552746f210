"""The CLI's options, derived from the settings dataclasses, and the checks made before any computation.

Every analysis option is a field of :class:`~attnscope.kernels.analysis.KernelSettings`,
:class:`~attnscope.circuit.build.CircuitSettings` or :class:`~attnscope.neurons.find.NeuronSettings`: its type and
default come from the dataclass, its metavar and help from :data:`HELP`.  A command lists the fields it
exposes with :func:`settings_options`; adding a field to a dataclass and a line to :data:`HELP` is all a
new option needs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
import types
import typing
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from attnscope.circuit.result import QUERY_CONDITIONED_CHOICES
from attnscope.core.cache import KINDS, cache_dir, mark_cache
from attnscope.core.errors import AttnscopeError, check_index
from attnscope.core.outputs import refuse_foreign
from attnscope.core.texts import open_source
from attnscope.models import parse_dtype

#: Shown in every command's help: what a text source may be, units and numbering.
TEXT_SOURCES = (
    "TEXT sources: a UTF-8 .txt/.md/.text file; a .jsonl file (one JSON object per line with a \"text\" string); "
    "a folder of those (binary files are skipped with a note); bundled:NAME, a text shipped with attnscope "
    "({names}), or bundled: for all of them; hf:DATASET[:CONFIG][:SPLIT] (a Hugging Face dataset, online). "
    "Lengths are in tokens of the model's tokenizer; layers, heads and neurons are numbered from 0."
)

MODEL_HELP = ("demo (bundled), a model folder (config.json + weights), a .gguf file, an installed model package "
              "(smollm2, all-MiniLM-L6-v2) or a Hugging Face hub id (gpt2, distilgpt2; online or in the HF cache)")

#: the options every command shares (global ones may also come before the subcommand)
ModelArg = Annotated[str, typer.Argument(metavar="MODEL", help=MODEL_HELP, show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the result as JSON on stdout")]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="neither read nor write the on-disk caches")]
DecodeOpt = Annotated[str, typer.Option("--decode-errors", metavar="strict|replace",
                                        help="undecodable bytes in text files: strict (an error naming the file and "
                                             "byte) or replace (U+FFFD)")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", metavar="DEVICE",
                                                  help="torch device: cpu, cuda, cuda:N or mps [default: cpu]")]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", metavar="DTYPE",
                                                 help="float32 (default), float64, float16 or bfloat16")]
ForceOpt = Annotated[bool, typer.Option("--force", help="replace files in --out that attnscope did not write "
                                        "(without it such a file is an error; attnscope's own files are always "
                                        "replaced)")]
RevisionOpt = Annotated[Optional[str], typer.Option("--revision", metavar="REV",
                                                    help="hub models only: branch, tag or commit of the weights")]


def _out_option(default: str) -> Any:
    """``--out DIR`` with the command's default shown in the help."""
    return typer.Option("--out", metavar="DIR", help="output folder (created; see --help of the "
                        f"command for what is written) [default: {default}]", show_default=False)


OutOpt = Annotated[Path, _out_option("attnscope-out")]  # report, demo
KernelsOutOpt = Annotated[Path, _out_option("attnscope-out/kernels")]
NeuronsOutOpt = Annotated[Path, _out_option("attnscope-out/neurons")]
EvolutionOutOpt = Annotated[Path, _out_option("attnscope-out/evolution")]


#: field -> (metavar, help).  Defaults are shown from the dataclass.
HELP: dict[str, tuple[str, str]] = {
    "samples": ("TEXT", "text source the kernels are estimated on (see TEXT sources)"),
    "n_ctx": ("TOKENS", "window length in tokens [default: min(model context, 256)]"),
    "n_samples": ("N", "estimation windows (the method uses 500); at least 1"),
    "n_heldout": ("N", "further held-out windows for the validations (TV, consistency); at least 1"),
    "seed": ("INT", "seed of the window sampling"),
    "layers": ("LAYERS", "layers to analyse, numbered from 0: 0,1,5 or 0-3 [default: all]"),
    "ref_norm": ("NORM", "the method's reference norm c (GPT-2: 3.5) [default: measured]"),
    "weights_query": ("TOKEN", "query of the layer-0 weights kernel: mean (the samples' mean embedding) or one token"),
    "batch_size": ("N", "windows per forward pass"),
    "calibration": ("TEXT", "the one calibration text (see TEXT sources)"),
    "window": ("TOKENS", "width of the windowed denominator (the method's 100)"),
    "heads": ("HEADS", "force the contextual heads of layer 0, numbered from 0: 0,2,6 or 0-3 [default: detected]"),
    "eval": ("TEXT", "held-out text to verify the neurons on (repeat the option) [default: bundled texts]"),
    "max_neurons": ("N", "neurons to explain and verify"),
    "bos": ("", "analyse every text with (--bos) or without (--no-bos) the BOS token in front [default: the "
            "model's convention: hub GPT-2 and Llama-style models with, the demo without; BERT: [CLS]]"),
    "executor": ("local|ray", "where the passes over the windows run: this process (local) or a Ray cluster (ray; "
                 "docs/distributed.md)"),
    "ray_address": ("auto|ADDR", "with --executor ray: auto (the cluster this node belongs to) or the head's "
                    "HOST:PORT [default: start a local cluster]"),
    "workers": ("N", "with --executor ray: worker actors, each holding the model once [default: one per cluster CPU]"),
    "query_conditioned": ("auto|on|off", "content factors per query token in the circuit's summary (on), one typical "
                          "query (off), or auto: on when the typical-query summary's FVU on the calibration text is "
                          "above 0.35 and the query-conditioned one is lower (docs/rotary-split.md)"),
}
_LISTS = {"layers": "--layers", "heads": "--heads"}  # list[int] fields, written 0,1,5 or 0-3


@dataclass
class Runtime:
    """Options that apply to the whole invocation (given before or after the subcommand)."""

    device: str = "cpu"
    dtype: str = "float32"
    revision: str | None = None


@dataclass
class ExecutorChoice:
    """Where the passes over the sample windows run (``--executor``; :func:`attnscope.core.executor.make_executor`)."""

    executor: str = "local"
    ray_address: str | None = None
    workers: int | None = None


@dataclass
class ModelChoice:
    """How the model's texts are analysed (recorded in every output as ``prepend_bos``)."""

    bos: bool | None = None  # a BOS token in front of every text; None: the model's own convention


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    assert f.default_factory is not dataclasses.MISSING, f"setting {f.name} has a default or a default_factory"
    return f.default_factory()


def _cli_type(name: str, hint: Any) -> Any:
    if name in _LISTS:
        return Optional[str]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        inner = args[0]
        return Optional[inner] if typing.get_origin(inner) is not list else Optional[list[str]]
    return hint


def settings_options(*groups: tuple[type, tuple[str, ...]]):
    """Decorator: one option per named field of each dataclass (type and default from the dataclass).

    The command receives the values as keyword arguments of the same names; :func:`build` turns them back
    into the dataclass.  A name given by several groups (``n_ctx``) becomes one option."""
    def deco(fn):
        sig = inspect.signature(fn, eval_str=True)
        params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        seen = {p.name for p in params}
        for cls, names in groups:
            fields = {f.name: f for f in dataclasses.fields(cls)}
            hints = typing.get_type_hints(cls)
            for n in names:
                if n in seen:
                    continue
                seen.add(n)
                metavar, help_ = HELP[n]
                default = _default(fields[n])
                if n in _LISTS or isinstance(default, list):
                    default = None
                flag = n.replace("_", "-")
                is_bool = _cli_type(n, hints[n]) in (bool, Optional[bool])
                opt = typer.Option(f"--{flag}/--no-{flag}" if is_bool else f"--{flag}", help=help_,
                                   **({} if is_bool else {"metavar": metavar}))
                params.append(inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=default,
                                                annotation=Annotated[_cli_type(n, hints[n]), opt]))
        fn.__signature__ = sig.replace(parameters=params)
        return fn
    return deco


def parse_index_list(spec: str | None, option: str) -> list[int] | None:
    """``0,1,5`` / ``0-3`` / ``all`` -> indices (or None for all); a one-line error names ``option``."""
    if spec is None or spec.strip() == "all":
        return None
    out: list[int] = []
    for part in spec.split(","):
        try:
            if "-" in part.strip()[1:]:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise AttnscopeError(f"{option} {spec!r}: the range {part} is empty; write low-high, "
                                         f"e.g. {hi}-{lo}")
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise AttnscopeError(f"{option} {spec!r} is not a list of numbers; write e.g. 0,1,2 or 0-5") from None
    if any(i < 0 for i in out):
        raise AttnscopeError(f"{option} {spec!r} holds a negative number; they are numbered from 0")
    return out


def build(cls: type, values: dict[str, Any]):
    """The settings dataclass from the command's keyword arguments (only the fields it exposes)."""
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in values.items() if k in names}
    for k, option in _LISTS.items():
        if k in kw:
            kw[k] = parse_index_list(kw[k], option)
    if "eval" in kw:
        kw["eval"] = kw["eval"] or None
    return cls(**kw)


# --- checks made before anything is loaded or computed -----------------------------------------------
def check_device(device: str) -> str:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise AttnscopeError(f"--device {device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise AttnscopeError(f"--device {device} was asked for but no CUDA device is available; use --device cpu")
        if dev.index is not None and dev.index >= n:
            raise AttnscopeError(f"--device {device}: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise AttnscopeError("--device mps was asked for but MPS is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise AttnscopeError(f"--device {device!r} is not supported; use cpu, cuda, cuda:N or mps")
    return device


def check_dtype(dtype: str) -> str:
    try:
        parse_dtype(dtype)
    except ValueError as err:
        raise AttnscopeError(f"--dtype: {err}") from None
    return dtype


def check_out(out: Path, option: str = "--out", writes: tuple[str, ...] = (), force: bool = False) -> Path:
    """The output folder exists or can be created, and a file can be written in it; none of the files it will
    write (``writes``, relative to ``out``) replaces one that attnscope did not write, unless ``force``."""
    if str(out) == "":
        raise AttnscopeError(f"{option} is an empty path; pass a folder")
    if out.exists() and not out.is_dir():
        raise AttnscopeError(f"{option} {out} is an existing file, not a folder; pass a folder path")
    created = [p for p in (out, *out.parents) if not p.exists()]  # removed again: a failed run leaves no folder
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".attnscope-probe-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise AttnscopeError(f"{option} {out} is not writable ({err.strerror}); "
                             "pass a folder you can write to") from None
    finally:
        for p in created:  # deepest first
            with contextlib.suppress(OSError):
                p.rmdir()
    if writes and out.is_dir():
        refuse_foreign(out, list(writes), force)
    return out


def check_cache() -> None:
    """The cache folder can be written (``--no-cache`` skips this)."""
    root = cache_dir()
    try:
        check_out(root, "the cache folder")
    except AttnscopeError as err:
        raise AttnscopeError(f"{err}: set ATTNSCOPE_CACHE to a writable folder or pass --no-cache") from None
    for kind in KINDS:  # a file where a part's folder goes would fail the first write
        if (root / kind).exists() and not (root / kind).is_dir():
            raise AttnscopeError(f"{root / kind} is a file where attnscope keeps its {kind} cache folder; set "
                                 "ATTNSCOPE_CACHE to another folder, move the file away, or pass --no-cache")
    mark_cache(root, create=True)


def check_sources(*specs: str | list[str] | None) -> None:
    """Open every text source once (cheap), so that a bad one is reported before any computation."""
    for spec in specs:
        for one in [spec] if isinstance(spec, str) else spec or []:
            open_source(one)


MAX_COUNT = 2**31 - 1  # no count option needs more; a larger one would only overflow further on


def check_analysis(analysis: Path | None) -> None:
    """``serve --analysis DIR``: a neurons.json in it must be the JSON object attnscope writes (``[]`` or a
    number used to fail deep in start-up)."""
    if analysis is None:
        return
    for p in (analysis / "neurons.json", analysis / "neurons" / "neurons.json"):
        if not p.is_file():
            continue
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise AttnscopeError(f"{p} is not valid JSON ({getattr(err, 'msg', err)}); "
                                 "re-run `attnscope neurons`") from None
        saved = any((f / "circuit.json").is_file() for f in (analysis, analysis / "circuit"))
        ok = (isinstance(d, dict) and isinstance(d.get("neurons"), list)
              and (saved or isinstance(d.get("circuit"), dict)))
        if not ok:
            kind = {"list": "list", "str": "string", "int": "number", "float": "number", "bool": "boolean",
                    "NoneType": "null"}.get(type(d).__name__, "object without the neurons and circuit records")
            raise AttnscopeError(f"{p} is a JSON {kind}, not the neurons result attnscope writes; pass the output "
                                 "folder of `attnscope report` or `attnscope neurons` (or re-run it)")
        return


def check_positive(**values: int | None) -> None:
    for name, v in values.items():
        if v is not None and v < 1:
            raise AttnscopeError(f"--{name.replace('_', '-')} {v} must be at least 1")
        if v is not None and v > MAX_COUNT:
            raise AttnscopeError(f"--{name.replace('_', '-')} {v} is too large; pass at most {MAX_COUNT}")


MAX_REF_NORM = 1e6  # c enters as c^2 / d_model next to a position's squared norm; beyond this it only overflows


def check_ref_norm(c: float | None) -> None:
    """``--ref-norm``: a finite, positive, bounded number (inf, nan or 1e300 used to overflow or write Infinity)."""
    if c is not None and not (math.isfinite(c) and 0 < c <= MAX_REF_NORM):
        raise AttnscopeError(f"--ref-norm {c} must be a finite number above 0 and at most {MAX_REF_NORM:g} (GPT-2: "
                             "3.5), or leave it out to measure it")


def check_seed(seed: int) -> None:
    if not 0 <= seed <= 2**63 - 1:
        raise AttnscopeError(f"--seed {seed} must be 0 or more and below 2^63")


def check_distinct_sources(a: str, b: str, names: tuple[str, str] = ("--a", "--b")) -> None:
    """Two text sources to compare must differ in content (identical texts would score as a perfect contrast)."""
    if open_source(a).content_sha256 == open_source(b).content_sha256:
        raise AttnscopeError(f"{names[0]} {a} and {names[1]} {b} hold the same text (same content hash); pass two "
                             "different text sources")


def check_kernel_settings(s, w) -> None:
    """Settings of :func:`~attnscope.kernels.analysis.analyse_kernels` that would make a number meaningless."""
    check_positive(n_samples=s.n_samples, n_heldout=s.n_heldout, batch_size=s.batch_size)
    if s.n_ctx is not None and not 8 <= s.n_ctx <= w.n_ctx:
        raise AttnscopeError(f"--n-ctx {s.n_ctx} is outside 8..{w.n_ctx} (the model's context); pass a value in it")
    for l in s.layers or []:
        check_index("layer", l, w.n_layers)
    check_ref_norm(s.ref_norm)
    check_seed(s.seed)


def check_circuit_settings(cs, w) -> None:
    """Settings of :func:`~attnscope.circuit.build.build_circuit` checked against the model."""
    check_positive(window=cs.window)

    if cs.query_conditioned not in QUERY_CONDITIONED_CHOICES:
        raise AttnscopeError(f"--query-conditioned {cs.query_conditioned!r} is not one of "
                             f"{', '.join(QUERY_CONDITIONED_CHOICES)}; pass auto, on or off")
    T = min(w.n_ctx, 256) if cs.n_ctx is None else cs.n_ctx
    if T > w.n_ctx:
        raise AttnscopeError(f"--n-ctx {T} exceeds the model's context of {w.n_ctx}; use at most {w.n_ctx}")
    need = max(cs.window + 1, 2 * (cs.min_position or cs.window // 4) + 1)
    if T < need:
        raise AttnscopeError(f"--n-ctx {T} is below --window {cs.window} + 1: the windowed denominator needs "
                             f"--n-ctx of at least {need}, or pass a smaller --window")
    for h in cs.heads or []:
        check_index("head", h, w.n_heads)


def check_executor_use(executor: str, *, layer: int = 0, verify: bool = True) -> None:
    """``--executor ray`` where it has work: the layer-0 neurons, ``contrast --verify``."""
    if executor == "local":
        return
    if layer != 0:
        raise AttnscopeError(f"--executor {executor} covers the layer-0 neurons only; pass --executor local with "
                             f"--layer {layer}")
    if not verify:
        raise AttnscopeError(f"--executor {executor} shards the --verify pass, and --verify was not given; add "
                             "--verify or leave --executor out")
