"""The task heads: the model's own, and the mix of every layer (adapting by pruning's head)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from transformers import BertTokenizerFast, DistilBertConfig, DistilBertForSequenceClassification

from conftest import GLUE_FIXTURES, LogitSpy, train_in_process
from diffprune import api
from diffprune.base import load_base
from diffprune.errors import DiffpruneError
from diffprune.heads import LayerMixClassifier, start_from_labels
from diffprune.methods import METHODS
from diffprune.methods.artifact import PATCH_FILE
from diffprune.patch import TaskPatch, export_model
from diffprune.training.settings import TrainSettings

MIX_HEAD = {f"classifier.{n}" for n in ("layer_mix.weight", "dense.weight", "dense.bias", "out_proj.weight",
                                        "out_proj.bias")}


def test_every_head_shares_the_base_and_its_fingerprint(tiny_model):
    own = load_base(tiny_model, 2)
    for head in ("cls-mix", "mean-mix"):
        mixed = load_base(tiny_model, 2, head=head)
        assert isinstance(mixed.model, LayerMixClassifier) and mixed.head == head
        assert mixed.fingerprint == own.fingerprint and mixed.base_names == own.base_names
        assert mixed.head_names == MIX_HEAD
        assert mixed.model.classifier.layer_mix.weight.shape == (3,)  # the embedding output and both layers


def test_the_mixed_head_is_the_papers(tiny_model):
    """A softmax-weighted average of every layer's [CLS] (or token mean) into Linear, ReLU, Linear."""
    torch.manual_seed(0)
    base = load_base(tiny_model, 3, head="cls-mix")
    model = base.model.eval()
    with torch.no_grad():
        model.classifier.layer_mix.weight.copy_(torch.tensor([0.5, -1.0, 2.0]))
    ids = torch.tensor([[101, 2023, 2003, 102, 0], [101, 2009, 102, 0, 0]])
    mask = (ids > 0).long()
    labels = torch.tensor([2, 0])
    out = model(input_ids=ids, attention_mask=mask, labels=labels)

    hidden = model.bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    weights = torch.softmax(torch.tensor([0.5, -1.0, 2.0]), 0)
    mixed = sum(w * h[:, 0] for w, h in zip(weights, hidden))
    head = model.classifier
    logits = head.out_proj(F.relu(head.dense(mixed)))
    torch.testing.assert_close(out.logits, logits)
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, labels))

    head.pooling = "mean"  # each layer's mean over its real tokens, padding left out
    means = [(h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True) for h in hidden]
    head = model.classifier
    logits = head.out_proj(F.relu(head.dense(sum(w * m for w, m in zip(weights, means)))))
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, logits)


def test_the_mixed_head_works_without_token_types_and_regresses(tmp_path):
    """DistilBERT takes no token_type_ids and names its layer count n_layers; a regression loss is MSE."""
    config = DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64)
    DistilBertForSequenceClassification(config).save_pretrained(tmp_path)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]
    BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}).save_pretrained(tmp_path)
    base = load_base(str(tmp_path), 1, regression=True, head="mean-mix")
    assert base.model.classifier.layer_mix.weight.shape == (3,)
    ids = torch.tensor([[2, 7, 8, 3]])
    out = base.model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([1.5]))
    torch.testing.assert_close(out.loss, (out.logits.squeeze() - 1.5) ** 2)


# distil's teacher is a full finetuning run, which keeps the model's own head (refused below)
@pytest.mark.parametrize("method", sorted(m for m, cls in METHODS.items() if cls.artifact == PATCH_FILE and m != "distil"))
def test_a_patch_with_a_mixed_head_scores_as_trained(method, tmp_path, tiny_model):
    """The patch records its head; eval loads the base with that head and reproduces the run."""
    out = tmp_path / method
    record, trained = train_in_process(out, tiny_model, method, max_steps=3, max_eval_samples=None, head="cls-mix")
    patch = TaskPatch.load(out / PATCH_FILE)
    assert patch.meta["head"] == "cls-mix" and set(patch.head) == MIX_HEAD
    with LogitSpy() as spy:
        assert api.evaluate_patch(out / PATCH_FILE, data_dir=str(GLUE_FIXTURES), model=tiny_model) == record["dev"]
    np.testing.assert_allclose(spy.last, trained, rtol=0, atol=1e-6)

    own = load_base(tiny_model, 2)  # a base with the model's own head does not fit the patch
    with pytest.raises(DiffpruneError, match="does not fit the model: it has head tensor"):
        patch.apply(own)
    with pytest.raises(DiffpruneError, match="no transformers architecture"):
        export_model(patch, load_base(tiny_model, 2, head="cls-mix"), tmp_path / "exported")
    assert not (tmp_path / "exported").exists()


def test_a_mixed_head_is_refused_where_the_result_is_no_patch(tmp_path, tiny_model):
    with pytest.raises(DiffpruneError, match="--head cls-mix needs a method whose result is a patch"):
        train_in_process(tmp_path / "full", tiny_model, "full", head="cls-mix")
    assert not (tmp_path / "full").exists()
    with pytest.raises(DiffpruneError, match="method 'distil' needs --head model"):
        train_in_process(tmp_path / "distil", tiny_model, "distil", head="cls-mix")
    assert not (tmp_path / "distil").exists()
    with pytest.raises(DiffpruneError, match="--head must be one of model, cls-mix, mean-mix"):
        TrainSettings(head="pooler")


def test_a_mixed_head_starts_at_the_labels(tiny_model):
    """Regression: the output starts at the training mean; classes: at their log frequencies."""
    regression = load_base(tiny_model, 1, regression=True, head="mean-mix")
    start_from_labels(regression.model, [1.0, 2.0, 4.5], regression=True)
    assert regression.model.classifier.out_proj.bias.tolist() == pytest.approx([2.5])
    classes = load_base(tiny_model, 3, head="cls-mix")
    start_from_labels(classes.model, [0, 0, 0, 1], regression=False)  # class 2 unseen: counted once
    torch.testing.assert_close(classes.model.classifier.out_proj.bias, torch.tensor([3 / 5, 1 / 5, 1 / 5]).log())
    own = load_base(tiny_model, 1, regression=True)
    before = own.model.classifier.bias.clone()
    start_from_labels(own.model, [1.0, 2.0], regression=True)  # the model's own head is left as it was
    assert torch.equal(own.model.classifier.bias, before)
