"""Training the demo model: data preparation (:mod:`.corpora`), the loop (:mod:`.loop`), evaluation."""

from attnscope.training.corpora import (
    EOT_TOKEN,
    EVAL_FRACTION,
    corpus_sha256,
    encode_text,
    eval_windows,
    load_corpora,
    split_corpus,
    train_tokenizer,
)
from attnscope.training.loop import TrainConfig, checkpoint_dir, train_demo

__all__ = [
    "EOT_TOKEN",
    "EVAL_FRACTION",
    "TrainConfig",
    "checkpoint_dir",
    "corpus_sha256",
    "encode_text",
    "eval_windows",
    "load_corpora",
    "split_corpus",
    "train_demo",
    "train_tokenizer",
]
