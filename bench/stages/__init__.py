"""Every benchmark stage, by name.  A stage takes the run's config (and, for some, a window count) and returns
``common.measure``'s dict; it runs in a fresh child process unless ``--in-process``."""

from __future__ import annotations

from .circuit import stage_circuit
from .command import stage_command, stage_hf_eager
from .kernels import stage_forward_tl, stage_kernels, stage_kernels_tl
from .neurons import stage_scoring, stage_scoring_naive, stage_verify, stage_verify_tl
from .weights import stage_extract, stage_extract_tl, stage_layer0, stage_machine

STAGES = {
    "machine": stage_machine,
    "extract": stage_extract,
    "extract_tl": stage_extract_tl,
    "layer0": stage_layer0,
    "kernels": stage_kernels,
    "kernels_tl": stage_kernels_tl,
    "forward_tl": stage_forward_tl,
    "hf_eager": stage_hf_eager,
    "command": stage_command,
    "circuit": stage_circuit,
    "scoring": stage_scoring,
    "scoring_naive": stage_scoring_naive,
    "verify": stage_verify,
    "verify_tl": stage_verify_tl,
}


def run_child(stage: str, cfg: dict, arg) -> dict:
    import torch

    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here (refusing to fall back to CPU)")
    torch.set_num_threads(cfg.get("threads", torch.get_num_threads()))
    fn = STAGES[stage]
    return fn(cfg, arg) if arg is not None else fn(cfg)
