"""Command-line interface: a thin layer over the Python API (``attnscope --help``).

One error path: every usage or input error prints one line ``error: what is wrong; how to fix it`` on
stderr and exits 2; an interrupt prints one line and exits 130.  Arguments are checked before anything
is computed.  Analysis options are derived from the settings dataclasses (:mod:`attnscope.cli.args`);
``--device``/``--dtype``/``--revision`` may be given before or after the subcommand.  Outputs are written
to a staging folder and published atomically; a rerun removes the files an older run of the same command
wrote and this one did not (listed in ``OUT/.attnscope-COMMAND-manifest.json``), never other files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from attnscope.circuit.build import CircuitSettings, build_circuit
from attnscope.cli import args as A
from attnscope.cli.args import DecodeOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelArg, NoCacheOpt, RevisionOpt
from attnscope.cli.boundary import run as run_with_boundary
from attnscope.cli.cache_cmds import cache_app
from attnscope.cli.show import (
    emit,
    print_contrast,
    print_kernel_summary,
    print_later_summary,
    print_neuron_summary,
    print_table,
    print_timeline,
)
from attnscope.core.cache import (
    caching,
)
from attnscope.core.errors import AttnscopeError, check_index
from attnscope.core.executor import running as _executor
from attnscope.core.outputs import overwriting, staged_output
from attnscope.core.texts import bundled_texts, decoding, open_source, reading_once, text_tokens
from attnscope.evolution.page import evolution_figures, write_evolution_page
from attnscope.evolution.run import EvolutionSettings, run_evolution
from attnscope.exact.forward import compare_with_model
from attnscope.kernels.analysis import KernelSettings, analyse_kernels
from attnscope.later.evaluate import find_later_neurons
from attnscope.later.method import LaterSettings
from attnscope.models import load_model
from attnscope.neurons.contrast import run_contrast
from attnscope.neurons.find import NeuronSettings, find_neurons
from attnscope.neurons.probe import check_probe_texts, context_probe
from attnscope.report import write_report
from attnscope.report.pipeline import run_report
from attnscope.report.plots import kernel_figures, neuron_figures
from attnscope.serve import serve_command
from attnscope.serve.contrast_scope import contrast_scope
from attnscope.training import TrainConfig, train_demo

_TEXTS = A.TEXT_SOURCES.format(names=", ".join(bundled_texts()))
app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
    help="attnscope: positional kernels, contextual heads and context-sensitive neurons of transformer models."
    f"\n\nMODEL is {A.MODEL_HELP}.\n\n{_TEXTS}\n\nCaches live in $ATTNSCOPE_CACHE (default ~/.cache/attnscope); "
    "see `attnscope cache info`.",
)
app.add_typer(cache_app, name="cache")

@app.callback()
def _global(ctx: typer.Context, device: DeviceOpt = None, dtype: DtypeOpt = None, revision: RevisionOpt = None) -> None:
    """Global options; each may also be given after the subcommand."""
    ctx.obj = A.Runtime(device=A.check_device(device or "cpu"), dtype=A.check_dtype(dtype or "float32"),
                        revision=revision)


def _runtime(ctx: typer.Context, device: str | None, dtype: str | None, revision: str | None) -> A.Runtime:
    """The global options, overridden by those given after the subcommand."""
    rt = ctx.find_object(A.Runtime) or A.Runtime()
    return A.Runtime(device=A.check_device(device) if device else rt.device,
                     dtype=A.check_dtype(dtype) if dtype else rt.dtype, revision=revision or rt.revision)


def _load(rt: A.Runtime, model: str, keep_hf: bool = False, bos: bool | None = None):
    """The model; ``bos`` (``--bos/--no-bos``): the BOS choice, None for the model's convention."""
    return load_model(model, device=rt.device, dtype=rt.dtype, revision=rt.revision, keep_hf=keep_hf, prepend_bos=bos)


@contextlib.contextmanager
def _session(no_cache: bool, decode_errors: str, *sources: str | list[str] | None, force: bool = False):
    """Cache, decoding and overwrite choices for the duration of one command; every text source is read first,
    once (a FIFO or ``<(cat f)`` can be read only once: later uses get the same documents)."""
    if not no_cache:
        A.check_cache()
    with caching(not no_cache), decoding(decode_errors), overwriting(force), reading_once():
        A.check_sources(*sources)
        yield


@app.command()
def info(ctx: typer.Context, model: ModelArg, as_json: JsonOpt = False, device: DeviceOpt = None,
         dtype: DtypeOpt = None, revision: RevisionOpt = None) -> None:
    """Architecture, layers, heads, positional scheme, context length and parameter count."""
    w = _load(_runtime(ctx, device, dtype, revision), model)
    emit(w.info(), as_json, lambda d: print_table(d, f"attnscope info {model}"))


@app.command(help="Recompute every head's attention and every MLP pre-activation from the weights and compare with "
             f"the model's own forward pass (max abs difference per layer).\n\n{_TEXTS}")
def check(
    ctx: typer.Context, model: ModelArg,
    text: Annotated[Optional[str], typer.Option(metavar="TEXT",
                                                help="text to run [default: the first bundled text]")] = None,
    n_tokens: Annotated[int, typer.Option(metavar="TOKENS",
                                          help="tokens of text to run (at most the model's context)")] = 128,
    as_json: JsonOpt = False, no_cache: NoCacheOpt = False, decode_errors: DecodeOpt = "strict",
    device: DeviceOpt = None, dtype: DtypeOpt = None, revision: RevisionOpt = None,
) -> None:
    A.check_positive(n_tokens=n_tokens)
    rt = _runtime(ctx, device, dtype, revision)
    with _session(no_cache, decode_errors, text):
        w, hf = _load(rt, model, keep_hf=True)
        src = text or f"bundled:{bundled_texts()[0]}"
        n = min(n_tokens, w.n_ctx)
        ids = text_tokens(src, w.tokenizer, max_tokens=n, min_tokens=n, bos_token_id=w.analysis_bos)
        d = compare_with_model(w, hf.to(dtype=w.dtype), ids[None])
    out = {"model": model, "text": src, "n_tokens": n, "max_abs_diff_pattern": max(d["pattern"]),
           "max_abs_diff_mlp_pre": max(d["mlp_pre"]), "per_layer": d}
    emit(out, as_json, lambda o: print_table({k: v for k, v in o.items() if k != "per_layer"}, "exact recomputation"))


_KERNEL_FIELDS = (KernelSettings, ("samples", "n_ctx", "n_samples", "n_heldout", "layers", "ref_norm", "weights_query",
                                   "seed", "batch_size"))
_CIRCUIT_FIELDS = (CircuitSettings, ("calibration", "n_ctx", "window", "heads", "query_conditioned"))
_NEURON_FIELDS = (NeuronSettings, ("eval", "max_neurons"))
_MODEL_FIELDS = (A.ModelChoice, ("bos",))
_EXECUTOR_FIELDS = (A.ExecutorChoice, ("executor", "ray_address", "workers"))


@app.command(help="Positional kernels of every head: categories, N_eff, decay, consistency, equivariance, TV checks."
             f"\n\nWrites OUT/kernels.json, OUT/kernels.safetensors and four figures.\n\n{_TEXTS}")
@A.settings_options(_KERNEL_FIELDS, _MODEL_FIELDS, _EXECUTOR_FIELDS)
def kernels(ctx: typer.Context, model: ModelArg, out: A.KernelsOutOpt = Path("attnscope-out/kernels"),
            force: A.ForceOpt = False, as_json: JsonOpt = False, no_cache: NoCacheOpt = False,
            decode_errors: DecodeOpt = "strict",
            device: DeviceOpt = None, dtype: DtypeOpt = None, revision: RevisionOpt = None, **kw) -> None:
    s = A.build(KernelSettings, kw)
    A.check_positive(n_samples=s.n_samples, n_heldout=s.n_heldout, n_ctx=s.n_ctx, batch_size=s.batch_size)
    A.check_ref_norm(s.ref_norm)
    A.check_seed(s.seed)
    rt = _runtime(ctx, device, dtype, revision)
    A.check_out(out, writes=("kernels.json", "kernels.safetensors"), force=force)
    with _session(no_cache, decode_errors, s.samples, force=force), \
            _executor(A.build(A.ExecutorChoice, kw), rt.device) as ex:
        w = _load(rt, model, bos=kw["bos"])
        A.check_kernel_settings(s, w)
        res = analyse_kernels(w, s, cache=not no_cache, progress=not as_json, executor=ex)
        with staged_output(out, "kernels") as tmp:
            res.save(tmp)
            figs = kernel_figures(res, tmp)
    if as_json:
        typer.echo(json.dumps(res.to_json(), indent=1, default=str))
        return
    print_kernel_summary(res)
    typer.echo(f"wrote {out / 'kernels.json'}, {out / 'kernels.safetensors'} and {len(figs)} figures in {out}")


@app.command(help="Contextual heads, calibrated denominators, and the context-sensitive neurons of the layer-0 MLP, "
             "found from the weights and one calibration text, explained and verified on held-out texts."
             "\n\nWrites OUT/neurons.json (everything), OUT/neurons.csv (one row per neuron: rank, predicted |d|, "
             f"whether it passes the measured threshold), OUT/traces.json and figures.\n\n{_TEXTS}")
@A.settings_options(_CIRCUIT_FIELDS, _NEURON_FIELDS, _MODEL_FIELDS, _EXECUTOR_FIELDS)
def neurons(ctx: typer.Context, model: ModelArg, out: A.NeuronsOutOpt = Path("attnscope-out/neurons"),
            force: A.ForceOpt = False, as_json: JsonOpt = False, no_cache: NoCacheOpt = False,
            decode_errors: DecodeOpt = "strict",
            device: DeviceOpt = None, dtype: DtypeOpt = None, revision: RevisionOpt = None,
            layer: Annotated[int, typer.Option(metavar="LAYER", help="MLP layer, numbered from 0; > 0 uses the "
                                               "effective-embedding method (docs/later-layers.md)")] = 0,
            **kw) -> None:
    cs, ns = A.build(CircuitSettings, kw), A.build(NeuronSettings, kw)
    A.check_positive(n_ctx=cs.n_ctx, window=cs.window, max_neurons=ns.max_neurons)
    rt = _runtime(ctx, device, dtype, revision)
    A.check_out(out, writes=("neurons.json", "neurons.csv"), force=force)
    A.check_executor_use(kw["executor"], layer=layer)
    with _session(no_cache, decode_errors, cs.calibration, ns.eval, force=force), \
            _executor(A.build(A.ExecutorChoice, kw), rt.device) as ex:
        w = _load(rt, model, bos=kw["bos"])
        A.check_circuit_settings(cs, w)
        if layer != 0:
            return run_later(w, layer, cs, ns.eval, n_cards=ns.max_neurons, out=out, as_json=as_json,
                             command="attnscope " + " ".join(sys.argv[1:]))
        circ = build_circuit(w, cs)
        res = find_neurons(w, circ, ns, progress=not as_json, executor=ex)
        with staged_output(out, "neurons") as tmp:
            res.save(tmp)
            circ.save(tmp / "circuit")  # NeuronResult.load reads it back
            figs = neuron_figures(res, circ, tmp)
    if as_json:
        typer.echo(json.dumps(res.to_json(), indent=1, default=str))
        return

    print_neuron_summary(res)
    typer.echo(f"wrote {out / 'neurons.json'}, {out / 'neurons.csv'} (one row per neuron), "
               f"{out / 'traces.json'} and {len(figs)} figures in {out}")


def _report(ctx: typer.Context, model: str, out: Path, rt: A.Runtime, no_cache: bool, decode_errors: str,
            kw: dict[str, Any], later_layers: str | None = None, force: bool = False) -> None:
    ks, cs, ns = A.build(KernelSettings, kw), A.build(CircuitSettings, kw), A.build(NeuronSettings, kw)
    A.check_positive(n_samples=ks.n_samples, n_heldout=ks.n_heldout, n_ctx=ks.n_ctx, window=cs.window,
                     max_neurons=ns.max_neurons, batch_size=ks.batch_size)
    A.check_ref_norm(ks.ref_norm)
    A.check_seed(ks.seed)
    later = A.parse_index_list(later_layers, "--later-layers") if later_layers else None
    if later is not None and 0 in later:
        raise AttnscopeError("--later-layers holds 0: layer 0 is the report's main analysis; list layers from 1")
    A.check_out(out, writes=("report.html", "kernels/kernels.json", "neurons/neurons.json", "neurons/neurons.csv"),
                force=force)
    with _session(no_cache, decode_errors, ks.samples, cs.calibration, ns.eval, force=force), \
            _executor(A.build(A.ExecutorChoice, kw), rt.device) as ex:
        w = _load(rt, model, bos=kw.get("bos"))
        A.check_kernel_settings(ks, w)
        A.check_circuit_settings(cs, w)
        for l in later or []:
            check_index("layer", l, w.n_layers)
        with staged_output(out, "report") as tmp:
            run_report(w, tmp, kernel_settings=ks, circuit_settings=cs, neuron_settings=ns,
                       command="attnscope " + " ".join(sys.argv[1:]), log=typer.echo, later_layers=later,
                       shown_out=out, executor=ex)
    typer.echo(f"report: {(out / 'report.html').resolve()}")


@app.command(help="Everything: kernels, contextual circuit, neurons, figures and one self-contained OUT/report.html "
             f"(OUT/kernels/ and OUT/neurons/ hold each stage's files).\n\n{_TEXTS}")
@A.settings_options(_KERNEL_FIELDS, _CIRCUIT_FIELDS, _NEURON_FIELDS, _MODEL_FIELDS, _EXECUTOR_FIELDS)
def report(ctx: typer.Context, model: ModelArg, out: A.OutOpt = Path("attnscope-out"),
           force: A.ForceOpt = False, no_cache: NoCacheOpt = False, decode_errors: DecodeOpt = "strict",
           device: DeviceOpt = None,
           dtype: DtypeOpt = None, revision: RevisionOpt = None,
           later_layers: Annotated[Optional[str], typer.Option(
               metavar="LAYERS", help="also the context neurons of these later MLP layers, numbered from 1: 1,2 or 1-3 "
               "(effective-embedding method, docs/later-layers.md; OUT/later/L{L}/) [default: none]")] = None,
           **kw) -> None:
    _report(ctx, model, out, _runtime(ctx, device, dtype, revision), no_cache, decode_errors, kw, later_layers, force)


@app.command()
def demo(ctx: typer.Context, out: A.OutOpt = Path("attnscope-out"), force: A.ForceOpt = False,
         no_cache: NoCacheOpt = False, device: DeviceOpt = None, dtype: DtypeOpt = None) -> None:
    """The whole method on the bundled demo model (offline, a few minutes on 2 cores); prints the report path."""
    _report(ctx, "demo", out, _runtime(ctx, device, dtype, None), no_cache, "strict", {}, force=force)


@app.command(help="Which labelled contexts a layer's MLP activations separate (linear probe, held-out recall). Each "
             "TEXT is one context, named by its file stem or bundled name; at least two, with distinct names, each "
             f"long enough for one window in its 70% training and 30% test parts.\n\n{_TEXTS}")
def probe(
    ctx: typer.Context, model: ModelArg,
    layer: Annotated[int, typer.Option(metavar="LAYER", help="layer whose MLP activations are probed (from 0)")] = 0,
    text: Annotated[Optional[list[str]], typer.Option(
        "--text", metavar="TEXT", help="labelled text (repeat) [default: every bundled text]")] = None,
    n_ctx: Annotated[Optional[int], typer.Option(metavar="TOKENS", help=A.HELP["n_ctx"][1])] = None,
    as_json: JsonOpt = False, no_cache: NoCacheOpt = False, decode_errors: DecodeOpt = "strict",
    device: DeviceOpt = None, dtype: DtypeOpt = None, revision: RevisionOpt = None,
) -> None:
    A.check_positive(n_ctx=n_ctx)
    check_probe_texts(text)
    rt = _runtime(ctx, device, dtype, revision)
    with _session(no_cache, decode_errors, text):
        w = _load(rt, model)
        check_index("layer", layer, w.n_layers)
        r = context_probe(w, layer=layer, texts=text or None, n_ctx=n_ctx)
    emit(r.to_json(), as_json, lambda d: print_table(
        {**{f"recall {k}": f"{v:.3f}" for k, v in d["recall"].items()}, "test accuracy": f"{d['test_accuracy']:.3f}",
         "chance": f"{d['chance']:.3f}", f"separated (recall >= {d['recall_min']})": ", ".join(d["separated"])},
        f"linear probe on layer-{layer} MLP activations"))


@app.command("train-demo")
def train_demo_cmd(
    corpora: Annotated[Optional[Path], typer.Option(metavar="DIR", show_default=False,
                                                    help="folder of labelled UTF-8 .txt corpora (required; see "
                                                         "docs/demo-model.md for the sources)")] = None,
    out: Annotated[Path, typer.Option(metavar="DIR", help="folder for the trained model")] = Path("demo-model"),
    max_minutes: Annotated[float, typer.Option(metavar="MIN", help="wall-clock training budget in minutes")] = 20.0,
    seed: Annotated[int, typer.Option(metavar="INT", help="seed")] = 0,
    steps: Annotated[Optional[int], typer.Option(metavar="N", help="fixed number of steps (reproducible; overrides "
                                                 "--max-minutes)")] = None,
    save_every: Annotated[Optional[int], typer.Option(
        metavar="N", help="also keep a checkpoint OUT/step-NNNNNN every N steps, at step 0 and at the last step "
                          "(needs --steps)")] = None,
    batch_size: Annotated[int, typer.Option(metavar="N", help="windows per step")] = 16,
    lr: Annotated[float, typer.Option(metavar="LR", help="peak learning rate")] = 3e-3,
    n_ctx: Annotated[int, typer.Option(metavar="TOKENS", help="context length (positions)")] = 256,
    n_embd: Annotated[int, typer.Option(metavar="N", help="model width")] = 192,
    threads: Annotated[Optional[int], typer.Option(metavar="N", help="torch threads for this run [default: leave "
                                                   "torch's setting]")] = None,
    force: A.ForceOpt = False,
) -> None:
    """Retrain the demo model (a small GPT-2) on the labelled corpora; see docs/demo-model.md."""
    corpora = _check_corpora(corpora)
    cfg = TrainConfig(corpora=corpora, out=out, seed=seed, max_minutes=max_minutes, steps=steps,
                      save_every=save_every, batch_size=batch_size, lr=lr, n_ctx=n_ctx, n_embd=n_embd, threads=threads)
    A.check_out(out, writes=("config.json", "model.safetensors", "training.json"), force=force)
    with overwriting(force), staged_output(out, "train-demo") as tmp:  # a failed run leaves no half-written model
        info = train_demo(replace(cfg, out=tmp, publish_to=out))
    ov = info["eval"]["overall"]
    typer.echo(json.dumps({"steps": info["steps"], "tokens_seen": info["tokens_seen"],
                           "wall_time_s": round(info["wall_time_s"], 1), "heldout_loss": round(ov["loss"], 4),
                           "unigram": round(ov["unigram"], 4), "checkpoints": len(info["checkpoints"])}))
    typer.echo(f"model written to {out}; use it with `attnscope info {out}`")


def _check_corpora(corpora: Path | None) -> Path:
    """The --corpora folder, checked (one-line errors otherwise)."""
    if corpora is None:
        raise AttnscopeError("train-demo needs --corpora DIR, a folder of labelled .txt files (docs/demo-model.md "
                             "lists the sources used for the bundled demo)")
    if not corpora.is_dir():
        raise AttnscopeError(f"--corpora {corpora} is not a folder; pass a folder of .txt files")
    if not sorted(corpora.glob("*.txt")):
        raise AttnscopeError(f"--corpora {corpora} holds no .txt files; pass a folder of labelled .txt corpora")
    open_source(corpora)  # every file strict UTF-8, some text in it (one-line errors otherwise)
    return corpora


@app.command()
@A.settings_options(_EXECUTOR_FIELDS)
def evolution(
    ctx: typer.Context,
    checkpoints: Annotated[list[str], typer.Argument(metavar="CHECKPOINT...", show_default=False,
                                                     help="model folders, a folder of checkpoint folders, or "
                                                          "hub-id@revision")],
    out: A.EvolutionOutOpt = Path("attnscope-out/evolution"), force: A.ForceOpt = False,
    n_samples: Annotated[int, typer.Option(metavar="N", help="kernel sample windows per checkpoint")] = 16,
    top_k: Annotated[int, typer.Option(metavar="K", help="top neurons followed across steps")] = 10,
    layer: Annotated[int, typer.Option(metavar="L", help="MLP layer whose neurons are tracked (0: the layer-0 "
                                                        "circuit; 1 or deeper: the later-layer method, which "
                                                        "GPT-NeoX/Pythia needs)")] = 0,
    as_json: JsonOpt = False, no_cache: NoCacheOpt = False, device: DeviceOpt = None, dtype: DtypeOpt = None,
    **kw) -> None:
    """How kernels, contextual heads and context neurons form over training checkpoints (--executor ray: one job
    per checkpoint; every checkpoint path must be readable on every node).

    Writes OUT/evolution.json, OUT/evolution.html and three figures; see docs/evolution.md."""
    A.check_positive(n_samples=n_samples, top_k=top_k)
    if layer < 0:
        raise AttnscopeError(f"--layer must be 0 or more, got {layer}")
    rt = _runtime(ctx, device, dtype, None)
    A.check_out(out, writes=("evolution.json", "evolution.html"), force=force)
    s = EvolutionSettings(kernel=KernelSettings(n_samples=n_samples, n_heldout=4), top_k=top_k, layer=layer)
    log = (lambda m: None) if as_json else (lambda m: typer.echo(m, err=True))
    with _session(no_cache, "strict", force=force), _executor(A.build(A.ExecutorChoice, kw), rt.device) as ex:
        res = run_evolution(checkpoints, s, cache=not no_cache, device=rt.device, dtype=rt.dtype, log=log,
                            executor=ex)
        with staged_output(out, "evolution") as tmp:
            res.save(tmp)
            figs = evolution_figures(res, tmp)
            write_evolution_page(res, tmp, figs, command="attnscope " + " ".join(sys.argv[1:]))
    if as_json:
        typer.echo(json.dumps(res.to_json(), indent=1, default=str))
        return
    print_timeline(res.timeline)
    typer.echo(f"wrote {out / 'evolution.json'}, {out / 'evolution.html'} and {len(figs)} figures")


# --- contrast (owner: truth helper; one self-contained block) -------------------------------------


@app.command(help="Predict every layer-0 neuron's difference in mean pre-activation between text sources A and B "
             "from the weights and the two sources' token counts (no forward pass over them); --verify runs the "
             "model on windows of both and scores the prediction (true effect size d, Spearman, precision@k, "
             f"recall@k).\n\nWrites OUT/contrast.json (one record per neuron) with --out.\n\n{_TEXTS}")
@A.settings_options((CircuitSettings, ("calibration", "n_ctx", "query_conditioned")), _MODEL_FIELDS,
                    _EXECUTOR_FIELDS)
def contrast(
    ctx: typer.Context, model: ModelArg,
    a: Annotated[str, typer.Option("--a", metavar="TEXT", help="text source A (see TEXT sources)")],
    b: Annotated[str, typer.Option("--b", metavar="TEXT", help="text source B (see TEXT sources)")],
    verify: Annotated[bool, typer.Option("--verify", help="run the model on windows of A and B")] = False,
    max_windows: Annotated[int, typer.Option(metavar="N", help="--verify: windows per source; at least 2")] = 16,
    top: Annotated[int, typer.Option(metavar="N", help="neurons printed each way")] = 10,
    out: Annotated[Optional[Path], typer.Option("--out", metavar="DIR", show_default=False,
                                                help="folder for contrast.json")] = None,
    force: A.ForceOpt = False, as_json: JsonOpt = False, no_cache: NoCacheOpt = False,
    decode_errors: DecodeOpt = "strict",
    device: DeviceOpt = None, dtype: DtypeOpt = None, revision: RevisionOpt = None, **kw) -> None:
    cs = A.build(CircuitSettings, kw)
    A.check_positive(n_ctx=cs.n_ctx, top=top)
    if max_windows < 2:
        raise AttnscopeError(f"--max-windows {max_windows}: at least 2 windows per source are needed")
    rt = _runtime(ctx, device, dtype, revision)
    if out is not None:
        A.check_out(out, writes=("contrast.json",), force=force)
    A.check_executor_use(kw["executor"], verify=verify)
    with _session(no_cache, decode_errors, cs.calibration, a, b, force=force), \
            _executor(A.build(A.ExecutorChoice, kw), rt.device) as ex:
        A.check_distinct_sources(a, b)
        w = _load(rt, model, bos=kw["bos"])
        A.check_circuit_settings(cs, w)
        circ = build_circuit(w, cs)
        res = run_contrast(w, circ, a, b, verify=verify, max_windows=max_windows, executor=ex)
        scope = contrast_scope(w, circ, res)
        if out is not None:
            with staged_output(out, "contrast") as tmp:
                res.save(tmp, scope.to_json())
    if as_json:
        typer.echo(json.dumps(res.to_json(scope.to_json()), default=str))
        return

    print_contrast(res, top, scope)
    if out is not None:
        typer.echo(f"wrote {out / 'contrast.json'}")


@app.command(help="A local web page: test a neuron's explanation on your own text (true vs predicted pre-activation "
             "per token, the evidence, and whether the input is inside the explanation's scope). Ctrl+C stops it.")
def serve(ctx: typer.Context, model: ModelArg, analysis: Annotated[Optional[Path], typer.Option(
              metavar="DIR", show_default=False, help="saved analysis: the output folder of `report` or `neurons` "
              "[default: compute the circuit and neurons at start-up]")] = None,
          port: Annotated[int, typer.Option(metavar="PORT", help="TCP port")] = 8000,
          host: Annotated[str, typer.Option(metavar="HOST", help="address to listen on; give it to expose the page "
                                            "beyond this machine")] = "127.0.0.1",
          allow_host: Annotated[Optional[list[str]], typer.Option(
              metavar="NAME", show_default=False, help="also answer requests whose Host header is NAME (repeatable; "
              "e.g. a reverse proxy's name) [default: localhost names and --host]")] = None,
          device: DeviceOpt = None, dtype: DtypeOpt = None, revision: RevisionOpt = None) -> None:
    A.check_analysis(analysis)
    serve_command(lambda: _load(_runtime(ctx, device, dtype, revision), model), analysis, host, port, typer.echo,
                  allow_hosts=tuple(allow_host or ()))


def main() -> None:
    """Run the CLI through the one error boundary (:mod:`attnscope.cli.boundary`); exits with its status."""
    run_with_boundary(app, setup=_log_to_stderr)


class _StderrHandler(logging.Handler):
    """Warnings as one line each on the current ``sys.stderr``."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write(f"attnscope: warning: {' '.join(record.getMessage().split())}\n")


def _log_to_stderr() -> None:
    log = logging.getLogger("attnscope")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        log.addHandler(_StderrHandler(logging.WARNING))


if __name__ == "__main__":
    main()


def run_later(w, layer: int, cs, eval: list[str] | None, *, n_cards: int, out: Path,
              as_json: bool, command: str = "") -> None:
    """``attnscope neurons MODEL --layer L`` for ``L > 0``: run; write OUT/neurons.json, OUT/neurons.csv and
    OUT/report.html (the later-layer section); print the summary."""
    check_index("layer", layer, w.n_layers)
    res = find_later_neurons(w, layer, cs, LaterSettings(eval=eval or None, n_cards=n_cards))
    with staged_output(out, "neurons") as tmp:
        res.save(tmp)
        write_report(tmp, model_info=res.model, later=[res], command=command,
                     provenance={"later-layer settings": res.settings, "timings_s": res.timings})
    if as_json:
        print(json.dumps(res.to_json(), indent=1, default=str))
        return
    print_later_summary(res)
    print(f"wrote {Path(out) / 'neurons.json'}, {Path(out) / 'neurons.csv'} (one row per neuron) and "
          f"{Path(out) / 'report.html'}")
