"""Ground truth for the demo model: which labelled contexts its MLP activations separate (a linear probe).

Each bundled text is one context (a language, a genre, an era).  A multinomial logistic-regression probe is
trained on the MLP activations of the first 70% of every text's tokens and tested on the last 30%; a context
counts as *separated* when its held-out recall is at least ``recall_min``.  This is measured, not assumed:
the neuron pipeline's labels are compared with it in the docs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from attnscope.core.errors import AttnscopeError
from attnscope.core.texts import bundled_texts, open_source, tokenize
from attnscope.exact.forward import iter_layers
from attnscope.models import ModelWeights


@dataclass
class ProbeResult:
    layer: int
    contexts: list[str]
    train_accuracy: float
    test_accuracy: float
    recall: dict[str, float]  # held-out recall per context
    confusion: list[list[int]]  # rows: true context, columns: predicted
    separated: list[str]
    recall_min: float
    chance: float

    def to_json(self) -> dict:
        return asdict(self)


@torch.no_grad()
def _features(w: ModelWeights, toks: Int[Tensor, " n"], layer: int, n_ctx: int, skip: int, stride: int
              ) -> Float[Tensor, "m d_mlp"]:
    feats = []
    bos = w.analysis_bos
    body = n_ctx - (1 if bos is not None else 0)
    for s0 in range(0, len(toks) - body + 1, body):
        win = toks[s0 : s0 + body]
        if bos is not None:
            win = torch.cat([torch.tensor([bos]), win])
        for a in iter_layers(w, win[None].to(w.device), stop_layer=layer):
            if a.layer == layer:
                feats.append(a.mlp_post[0, skip::stride].float().cpu())
    return torch.cat(feats) if feats else torch.zeros(0, w.d_mlp)


def _context_name(spec: str) -> str:
    return spec.split(":", 1)[1] if spec.startswith("bundled:") else spec.rstrip("/").rsplit("/", 1)[-1].split(".")[0]


def check_probe_texts(texts: list[str] | None) -> None:
    """At least two texts with distinct context names (a one-line error otherwise)."""
    if texts is None:
        return
    if len(texts) < 2:
        raise AttnscopeError(f"the probe needs at least two --text contexts to separate, got {len(texts)}; "
                             "repeat --text, e.g. --text a.txt --text b.txt")
    names = [_context_name(s) for s in texts]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise AttnscopeError(f"two --text sources share the context name {dup[0]!r} (the file stem); rename one")


def context_probe(w: ModelWeights, *, layer: int = 0, texts: list[str] | None = None, n_ctx: int | None = None,
                  skip: int = 32, stride: int = 2, recall_min: float = 0.8, epochs: int = 300, seed: int = 0
                  ) -> ProbeResult:
    """Train and test the probe on the bundled texts (or ``texts``, source specs whose stem is the label)."""
    check_probe_texts(texts)
    specs = texts or [f"bundled:{n}" for n in bundled_texts()]
    names = [_context_name(s) for s in specs]
    T = n_ctx or min(w.n_ctx, 256)
    if not skip < T <= w.n_ctx:
        raise AttnscopeError(f"--n-ctx {T} must exceed the {skip} skipped positions and fit the model's context "
                             f"of {w.n_ctx}")
    body = T - (1 if w.prepend_bos and w.bos_token_id is not None else 0)
    streams = [torch.as_tensor(tokenize(open_source(spec), w.tokenizer)) for spec in specs]
    for spec, toks in zip(specs, streams):  # every text checked before any activation is computed
        if min(int(0.7 * len(toks)), len(toks) - int(0.7 * len(toks))) < body:
            raise AttnscopeError(f"{spec} has {len(toks)} tokens; the probe needs at least {-(-body * 10 // 3)} (one "
                                 f"{body}-token window in both its 70% training and 30% test parts); pass a longer "
                                 "text or a smaller --n-ctx")
    Xtr, ytr, Xte, yte = [], [], [], []
    for c, toks in enumerate(streams):
        cut = int(0.7 * len(toks))
        a = _features(w, toks[:cut], layer, T, skip, stride)
        b = _features(w, toks[cut:], layer, T, skip, stride)
        Xtr.append(a)
        ytr.append(torch.full((len(a),), c))
        Xte.append(b)
        yte.append(torch.full((len(b),), c))
    Xtr_t, ytr_t, Xte_t, yte_t = torch.cat(Xtr), torch.cat(ytr), torch.cat(Xte), torch.cat(yte)
    mu, sd = Xtr_t.mean(0), Xtr_t.std(0) + 1e-6
    Xtr_t, Xte_t = (Xtr_t - mu) / sd, (Xte_t - mu) / sd
    C = len(specs)
    # class-balanced weights so small texts count as much as large ones
    counts = torch.bincount(ytr_t, minlength=C).float()
    cw = (counts.sum() / (C * counts.clamp(min=1)))
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(Xtr_t.shape[1], C)
    torch.nn.init.normal_(lin.weight, std=0.01, generator=g)
    torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=epochs, line_search_fn="strong_wolfe")
    loss_fn = torch.nn.CrossEntropyLoss(weight=cw)

    def closure():
        opt.zero_grad()
        loss = loss_fn(lin(Xtr_t), ytr_t) + 1e-3 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        ptr = lin(Xtr_t).argmax(-1)
        pte = lin(Xte_t).argmax(-1)
    conf = torch.zeros(C, C, dtype=torch.long)
    conf.index_put_((yte_t, pte), torch.ones_like(yte_t), accumulate=True)
    recall = {names[c]: float(conf[c, c] / conf[c].sum().clamp(min=1)) for c in range(C)}
    return ProbeResult(layer=layer, contexts=names, train_accuracy=float((ptr == ytr_t).float().mean()),
                       test_accuracy=float((pte == yte_t).float().mean()), recall=recall, confusion=conf.tolist(),
                       separated=[n for n, r in recall.items() if r >= recall_min], recall_min=recall_min,
                       chance=1.0 / C)
