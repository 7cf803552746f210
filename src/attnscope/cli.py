"""Command-line interface: a thin layer over the Python API (``attnscope --help``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import AttnscopeError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="attnscope: positional kernels, contextual heads and context-sensitive neurons of transformer models.\n\n"
    "MODEL is `demo` (bundled), a local folder, a .gguf file, an installed model package "
    "(smollm2, all-MiniLM-L6-v2) or a Hugging Face hub id (gpt2, gpt2-medium, distilgpt2).",
)
STATE: dict[str, str] = {"device": "cpu", "dtype": "float32"}

ModelArg = Annotated[str, typer.Argument(help="demo, a folder, a .gguf file, smollm2, all-MiniLM-L6-v2, or a hub id")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the result as JSON on stdout")]


@app.callback()
def _global(
    device: Annotated[str, typer.Option(help="torch device: cpu, cuda, cuda:1, mps")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32 (default), float64, float16 or bfloat16")] = "float32",
) -> None:
    from .models import parse_dtype

    try:
        parse_dtype(dtype)
    except ValueError as err:
        raise AttnscopeError(str(err)) from None
    STATE.update(device=device, dtype=dtype)


def _load(model: str):
    from .models import load_model

    return load_model(model, device=STATE["device"], dtype=STATE["dtype"])


def _emit(obj, as_json: bool, human) -> None:
    if as_json:
        typer.echo(json.dumps(obj, indent=2, default=str))
    else:
        human(obj)


def _print_table(d: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, show_header=False)
    for k, v in d.items():
        t.add_row(str(k), str(v))
    Console().print(t)


@app.command()
def info(model: ModelArg, as_json: JsonOpt = False) -> None:
    """Architecture, layers, heads, positional scheme, context length and parameter count."""
    w = _load(model)
    _emit(w.info(), as_json, lambda d: _print_table(d, f"attnscope info {model}"))


@app.command()
def check(
    model: ModelArg,
    text: Annotated[Optional[str], typer.Option(help="text file/folder/JSONL (default: bundled text)")] = None,
    n_tokens: Annotated[int, typer.Option(help="tokens of text to run")] = 128,
    as_json: JsonOpt = False,
) -> None:
    """Recompute every head's attention and every MLP pre-activation from the weights and compare with the
    model's own forward pass (max abs difference per layer)."""
    from .forward import compare_with_model
    from .models import load_model
    from .texts import bundled_texts, text_tokens

    w, hf = load_model(model, device=STATE["device"], dtype=STATE["dtype"], keep_hf=True)
    src = text or f"bundled:{bundled_texts()[0]}"
    n = min(n_tokens, w.n_ctx)
    ids = text_tokens(src, w.tokenizer, max_tokens=n, min_tokens=n, bos_token_id=w.bos_token_id if w.prepend_bos else None)
    d = compare_with_model(w, hf.to(dtype=w.dtype), ids[None])
    out = {"model": model, "text": src, "n_tokens": n, "max_abs_diff_pattern": max(d["pattern"]),
           "max_abs_diff_mlp_pre": max(d["mlp_pre"]), "per_layer": d}
    _emit(out, as_json, lambda o: _print_table({k: v for k, v in o.items() if k != "per_layer"}, "exact recomputation"))


def _parse_layers(spec: str | None) -> list[int] | None:
    if spec is None or spec == "all":
        return None
    out: list[int] = []
    try:
        for part in spec.split(","):
            if "-" in part:
                a, b = part.split("-")
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise AttnscopeError(f"--layers {spec!r} is not a list of layer numbers; write e.g. 0,1,2 or 0-5") from None
    return out


@app.command()
def kernels(
    model: ModelArg,
    layers: Annotated[Optional[str], typer.Option(help="layers to analyse: 0,1,5 or 0-3 (default all)")] = None,
    samples: Annotated[str, typer.Option(help="text source for the estimates (default: bundled texts)")] = "bundled:",
    n_samples: Annotated[int, typer.Option(help="sample windows for the estimates (the method: 500)")] = 32,
    n_heldout: Annotated[int, typer.Option(help="further disjoint windows for the validations")] = 8,
    n_ctx: Annotated[Optional[int], typer.Option(help="window length (default min(context, 256))")] = None,
    ref_norm: Annotated[Optional[float], typer.Option(help="the method's reference norm c (GPT-2: 3.5); default measured")] = None,
    seed: Annotated[int, typer.Option(help="sampling seed")] = 0,
    out: Annotated[Path, typer.Option(help="output folder")] = Path("attnscope-out/kernels"),
    no_cache: Annotated[bool, typer.Option("--no-cache", help="recompute even if cached")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Positional kernels of every head: categories, N_eff, decay, consistency, equivariance, TV checks.

    Writes OUT/kernels.json, OUT/kernels.safetensors and four figures."""
    from .kernels import KernelSettings, analyse_kernels
    from .plots import kernel_figures

    w = _load(model)
    s = KernelSettings(samples=samples, n_ctx=n_ctx, n_samples=n_samples, n_heldout=n_heldout, seed=seed,
                       layers=_parse_layers(layers), ref_norm=ref_norm)
    res = analyse_kernels(w, s, cache=not no_cache, progress=not as_json)
    res.save(out)
    figs = kernel_figures(res, out)
    if as_json:
        typer.echo(json.dumps(res.to_json(), indent=1, default=str))
        return
    _print_kernel_summary(res)
    typer.echo(f"wrote {out / 'kernels.json'}, {out / 'kernels.safetensors'} and {len(figs)} figures in {out}")


def _print_kernel_summary(res) -> None:
    from collections import Counter

    from rich.console import Console
    from rich.table import Table

    from .kernels import CATEGORIES

    t = Table(title="kernel categories per layer; median TV of the decomposition and of kernel vs attention")
    t.add_column("layer")
    short = {"sharp local decay": "local", "slow decay": "slow", "uniform": "uniform", "previous token": "prev",
             "current token": "self", "first-token sink": "sink", "other": "other"}
    for c in CATEGORIES:
        t.add_column(short[c], justify="right")
    t.add_column("TV dec", justify="right")
    t.add_column("TV kern", justify="right")
    for l in sorted({r.layer for r in res.records}):
        recs = [r for r in res.records if r.layer == l]
        cnt = Counter(r.category for r in recs)
        tvd = sorted(r.tv_decomposition["median"] for r in recs)[len(recs) // 2]
        tvk = sorted(r.tv_kernel_vs_attention for r in recs)[len(recs) // 2]
        t.add_row(str(l), *[str(cnt.get(c, "")) for c in CATEGORIES], f"{tvd:.3f}", f"{tvk:.3f}")
    Console().print(t)


@app.command()
def neurons(
    model: ModelArg,
    calibration: Annotated[str, typer.Option(help="the one calibration text")] = "bundled:en_moby_dick",
    eval: Annotated[Optional[list[str]], typer.Option("--eval", help="held-out texts (repeat); default: bundled texts")] = None,
    n_ctx: Annotated[Optional[int], typer.Option(help="tokens of calibration/eval text (default min(context, 256))")] = None,
    heads: Annotated[Optional[str], typer.Option(help="force the contextual heads, e.g. 0,2,6")] = None,
    window: Annotated[int, typer.Option(help="windowed-denominator width (the method's 100)")] = 100,
    max_neurons: Annotated[int, typer.Option(help="neurons to explain and verify")] = 64,
    out: Annotated[Path, typer.Option(help="output folder")] = Path("attnscope-out/neurons"),
    as_json: JsonOpt = False,
    layer: Annotated[int, typer.Option(help="MLP layer; > 0 uses effective embeddings (docs/later-layers.md)")] = 0,
) -> None:
    """Contextual heads, calibrated denominators, and the context-sensitive neurons of the layer-0 MLP,
    found from the weights and one calibration text, explained and verified on held-out texts.

    Writes OUT/neurons.json, OUT/traces.json and figures."""
    from .circuit import CircuitSettings, build_circuit
    from .neurons import NeuronSettings, find_neurons
    from .plots import neuron_figures

    w = _load(model)
    cs = CircuitSettings(calibration=calibration, n_ctx=n_ctx, window=window, heads=_parse_layers(heads))
    if layer != 0:
        from .later_eval import run_later

        return run_later(w, layer, cs, eval, n_cards=max_neurons, out=out, as_json=as_json)
    circ = build_circuit(w, cs)
    res = find_neurons(w, circ, NeuronSettings(eval=eval or None, max_neurons=max_neurons), progress=not as_json)
    res.save(out)
    figs = neuron_figures(res, out)
    if as_json:
        typer.echo(json.dumps(res.to_json(), indent=1, default=str))
        return
    _print_neuron_summary(res)
    typer.echo(f"wrote {out / 'neurons.json'} and {len(figs)} figures in {out}")


def _print_neuron_summary(res) -> None:
    from rich.console import Console
    from rich.table import Table

    s = res.summary()
    con = Console()
    con.print(f"contextual heads {s['heads']}; {s['n_neurons_found']} of {s['n_neurons_scored']} neurons found; "
              f"{s['n_verified']} verified: median r = {s['median_r'] or float('nan'):.3f}, "
              f"median FVU = {s['median_fvu'] or float('nan'):.3f}; circuit FVU = {res.fidelity['fvu']:.3f}")
    t = Table(title="conditions")
    for c in ("condition", "measured", "threshold", "ok"):
        t.add_column(c)
    for c in res.circuit["conditions"]:
        t.add_row(c["name"], f"{c['measured']:.3f}", f"{c['threshold']:g}", "yes" if c["ok"] else "NO")
    con.print(t)
    t = Table(title="top neurons")
    for c in ("neuron", "effect", "r", "FVU", "label", "top tokens", "fired on cal."):
        t.add_column(c)
    for r in res.records[:15]:
        t.add_row(str(r.index), f"{r.effect:.1f}", f"{r.r:.2f}", f"{r.fvu:.2f}", r.label or "",
                  " ".join(repr(tok)[1:-1] for tok, _ in r.top_positive_tokens[:6]), "yes" if r.fired_on_calibration else "no")
    con.print(t)


@app.command()
def report(
    model: ModelArg,
    out: Annotated[Path, typer.Option(help="output folder")] = Path("attnscope-out"),
    samples: Annotated[str, typer.Option(help="text source for the kernels (default: bundled texts)")] = "bundled:",
    n_samples: Annotated[int, typer.Option(help="sample windows for the kernels (the method: 500)")] = 32,
    n_ctx: Annotated[Optional[int], typer.Option(help="window length (default min(context, 256))")] = None,
    layers: Annotated[Optional[str], typer.Option(help="layers for the kernels (default all)")] = None,
    calibration: Annotated[str, typer.Option(help="the one calibration text")] = "bundled:en_moby_dick",
    eval: Annotated[Optional[list[str]], typer.Option("--eval", help="held-out texts (repeat)")] = None,
    heads: Annotated[Optional[str], typer.Option(help="force the contextual heads, e.g. 0,2,6")] = None,
    max_neurons: Annotated[int, typer.Option(help="neurons to explain and verify")] = 64,
) -> None:
    """Everything: kernels, contextual circuit, neurons, figures and one self-contained OUT/report.html."""
    from .circuit import CircuitSettings
    from .kernels import KernelSettings
    from .neurons import NeuronSettings
    from .pipeline import run_report

    w = _load(model)
    res = run_report(
        w, out,
        kernel_settings=KernelSettings(samples=samples, n_samples=n_samples, n_ctx=n_ctx, layers=_parse_layers(layers)),
        circuit_settings=CircuitSettings(calibration=calibration, n_ctx=n_ctx, heads=_parse_layers(heads)),
        neuron_settings=NeuronSettings(eval=eval or None, max_neurons=max_neurons),
        command="attnscope " + " ".join(sys.argv[1:]), log=typer.echo,
    )
    typer.echo(f"report: {res.report.resolve()}")


@app.command()
def demo(out: Annotated[Path, typer.Option(help="output folder")] = Path("attnscope-out")) -> None:
    """The whole method on the bundled demo model (offline, a few minutes on 2 cores); prints the report path."""
    report(model="demo", out=out, samples="bundled:", n_samples=32, n_ctx=None, layers=None,
           calibration="bundled:en_moby_dick", eval=None, heads=None, max_neurons=64)


@app.command()
def probe(
    model: ModelArg,
    layer: Annotated[int, typer.Option(help="layer whose MLP activations are probed")] = 0,
    text: Annotated[Optional[list[str]], typer.Option("--text", help="labelled texts (repeat); default: bundled")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Which labelled contexts a layer's MLP activations separate (linear probe, held-out recall)."""
    from .errors import check_index
    from .probe import context_probe

    w = _load(model)
    check_index("layer", layer, w.n_layers)
    r = context_probe(w, layer=layer, texts=text or None)
    _emit(r.to_json(), as_json, lambda d: _print_table(
        {**{f"recall {k}": f"{v:.3f}" for k, v in d["recall"].items()}, "test accuracy": f"{d['test_accuracy']:.3f}",
         "chance": f"{d['chance']:.3f}", f"separated (recall >= {d['recall_min']})": ", ".join(d["separated"])},
        f"linear probe on layer-{layer} MLP activations"))


@app.command("train-demo")
def train_demo_cmd(
    out: Annotated[Path, typer.Option(help="folder for the trained model")] = Path("demo-model"),
    corpora: Annotated[Path, typer.Option(help="folder of labelled .txt corpora")] = Path("../shared/corpora"),
    max_minutes: Annotated[float, typer.Option(help="wall-clock training budget")] = 20.0,
    seed: Annotated[int, typer.Option(help="seed")] = 0,
) -> None:
    """Retrain the demo model (a small GPT-2) on the labelled corpora; see docs/demo-model.md."""
    from .train import train_demo

    if not corpora.is_dir():
        raise AttnscopeError(f"no corpora folder at {corpora}; pass --corpora PATH (a folder of .txt files)")
    info = train_demo(corpora, out, seed=seed, max_minutes=max_minutes)
    typer.echo(json.dumps({k: info[k] for k in info if k in ("steps", "tokens_seen", "wall_time_s", "heldout_loss", "unigram")},
                          default=str))
    typer.echo(f"model written to {out}; use it with `attnscope info {out}`")


# --- contrast (owner: truth helper; one self-contained block) -------------------------------------


@app.command()
def contrast(
    model: ModelArg,
    a: Annotated[str, typer.Option("--a", help="text source A (file, folder, JSONL or bundled:NAME)")],
    b: Annotated[str, typer.Option("--b", help="text source B")],
    verify: Annotated[bool, typer.Option("--verify", help="run the model on windows of A and B and score the prediction")] = False,
    calibration: Annotated[str, typer.Option(help="the one calibration text")] = "bundled:en_moby_dick",
    n_ctx: Annotated[Optional[int], typer.Option(help="window length (default min(context, 256))")] = None,
    max_windows: Annotated[int, typer.Option(help="--verify: windows per source")] = 16,
    top: Annotated[int, typer.Option(help="neurons printed each way")] = 10,
    out: Annotated[Optional[Path], typer.Option(help="output folder for contrast.json")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Predict every layer-0 neuron's difference in mean pre-activation between sources A and B from the
    weights and the two sources' token counts (no forward pass); --verify measures it."""
    from rich.console import Console
    from rich.table import Table

    from .circuit import CircuitSettings, build_circuit
    from .contrast import run_contrast
    from .texts import open_source

    if top < 1 or max_windows < 2:
        raise AttnscopeError("--top must be >= 1 and --max-windows >= 2")
    for spec in (a, b):
        open_source(spec)  # one-line error for a missing source before the model loads
    w = _load(model)
    res = run_contrast(w, build_circuit(w, CircuitSettings(calibration=calibration, n_ctx=n_ctx)), a, b,
                       verify=verify, max_windows=max_windows)
    if out is not None:
        res.save(out)
    if as_json:
        typer.echo(json.dumps(res.to_json(), default=str))
        return
    con = Console()
    for sign, name in ((1, a), (-1, b)):
        t = Table(title=f"neurons higher on {name} (predicted d = predicted difference / calibration std)")
        for col in ("neuron", "predicted d", "true d", "bag / direct / other heads", "token evidence"):
            t.add_column(col)
        for r in res.top(top, sign):
            ev = r.evidence_a if sign > 0 else r.evidence_b
            t.add_row(str(r.index), f"{r.predicted_d:+.2f}", "" if r.true_d is None else f"{r.true_d:+.2f}",
                      " / ".join(f"{r.parts[k]:+.2f}" for k in ("contextual bag", "direct", "other heads")),
                      " ".join(repr(tok)[1:-1] for tok, _ in ev[:6]))
        con.print(t)
    if res.verification:
        v = res.verification
        con.print(f"verified on {v.n_positions_a} + {v.n_positions_b} positions: Spearman {v.scores['spearman']:.3f} "
                  f"(token-shuffled null {v.null_scores['spearman']:.3f}); precision@10/20/50 "
                  + "/".join(f"{x:.2f}" for x in v.scores["precision"].values()) + "; recall@10/20/50 "
                  + "/".join(f"{x:.2f}" for x in v.scores["recall"].values()) + f"; {v.n_true} neurons with |d| >= 1")
    if out is not None:
        con.print(f"wrote {out / 'contrast.json'}")


def main() -> None:
    """Console entry point: errors the user can fix are one line on stderr, exit status 2."""
    try:
        app(standalone_mode=False)
    except AttnscopeError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        sys.exit(130)
    except Exception as err:  # click usage errors
        import click

        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(err.exit_code)
        raise


if __name__ == "__main__":
    main()
