"""The contract every registered method keeps, on the tiny BERT and the MRPC fixtures:

* what it saves, loaded again, reproduces the trained model's dev scores and logits;
* where that is a patch (every method but full finetuning and LoRA, whose results are a whole
  model and a low-rank adapter): applying it to a fresh base gives the trained model's outputs,
  reverting restores the base bit for bit, and the exported HF folder equals the applied patch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForSequenceClassification

from conftest import GLUE_FIXTURES, LogitSpy, train_in_process
from diffprune import api
from diffprune.base import load_base
from diffprune.glue import get_task, make_collator
from diffprune.methods import METHODS
from diffprune.methods.artifact import PATCH_FILE
from diffprune.patch import TaskPatch, export_model
from diffprune.training.settings import TrainSettings

GLUE = str(GLUE_FIXTURES)
NOT_PATCHES = {"full": "a whole model", "lora": "a low-rank adapter (dense once merged)"}


def _dev_logits(model, base) -> np.ndarray:
    data = api.load_task_data(get_task("MRPC"), base, TrainSettings(task="MRPC", data_dir=GLUE), with_train=False)
    with LogitSpy() as spy:
        api.dev_metrics(model, data, make_collator(base.tokenizer), Accelerator(), 128)
    return spy.last


@pytest.fixture(scope="module")
def initial_logits(tiny_model) -> np.ndarray:
    """Full-dev logits of the untrained tiny model (base and head as saved)."""
    base = load_base(tiny_model, 2, labels=get_task("MRPC").labels)
    return _dev_logits(base.model, base)


def test_the_methods_that_are_not_patches_are_named():
    assert set(NOT_PATCHES) <= set(METHODS)
    assert all(METHODS[m].artifact == PATCH_FILE for m in set(METHODS) - set(NOT_PATCHES))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_keeps_the_contract(method, tmp_path, tiny_model, initial_logits):
    out = tmp_path / method
    record, trained = train_in_process(out, tiny_model, method, max_steps=3, max_eval_samples=None)
    assert np.abs(trained - initial_logits).max() > 1e-5  # training did change the model

    with LogitSpy() as spy:  # save -> load reproduces the run
        metrics = api.evaluate_run(out, GLUE)
    assert metrics == record["dev"]
    # The dev scores alone say little (the tiny random model predicts one class): the logits
    # too. The diff methods store fp16 values by default, ~1e-7 off; 3 steps move them by 1e-4.
    np.testing.assert_allclose(spy.last, trained, rtol=0, atol=1e-6)
    if method in NOT_PATCHES:
        return

    patch = TaskPatch.load(out / PATCH_FILE)
    base = load_base(tiny_model, 2, labels=get_task("MRPC").labels)
    before = {k: v.detach().clone() for k, v in base.model.state_dict().items()}
    applied = patch.apply(base)
    patched = _dev_logits(base.model, base)
    np.testing.assert_allclose(patched, trained, rtol=0, atol=1e-6)

    export_dir = tmp_path / "exported"
    applied.revert()
    assert all(torch.equal(before[k], v) for k, v in base.model.state_dict().items())
    export_model(patch, base, export_dir)
    exported = AutoModelForSequenceClassification.from_pretrained(export_dir)
    assert torch.equal(_dev_logits_tensor(exported, base), torch.from_numpy(patched))
    assert all(torch.equal(before[k], v) for k, v in base.model.state_dict().items())  # export reverts too


def _dev_logits_tensor(model, base) -> torch.Tensor:
    return torch.from_numpy(_dev_logits(model, base))
