"""The shared base: fingerprint, head, load errors, and architectures other than BERT."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_other

from diffprune.base import fingerprint, load_base
from diffprune.errors import DiffpruneError


def _one_ulp_copy(src: str, dst: Path, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy a model folder, moving one element of tensor `name` up by one ulp."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    before = tensors[name].clone()
    flat = tensors[name].view(-1)
    flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf")))
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return before, tensors[name]


def test_fingerprint_is_stable_across_loads(tiny_model):
    a, b = load_base(tiny_model), load_base(tiny_model)
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint.startswith("sha256:") and len(a.fingerprint) == len("sha256:") + 32
    # the fresh head is not part of the base: a different head does not move the fingerprint
    assert load_base(tiny_model, 5).fingerprint == a.fingerprint


def test_fingerprint_changes_with_one_ulp(tiny_model, tmp_path):
    name = "bert.encoder.layer.1.attention.self.query.weight"
    before, after = _one_ulp_copy(tiny_model, tmp_path / "moved", name)
    assert not torch.equal(before, after)
    assert (after - before).abs().max() < 1e-6  # really the smallest possible change
    assert load_base(tmp_path / "moved").fingerprint != load_base(tiny_model).fingerprint


def test_fingerprint_function_sees_names_shapes_and_dtypes():
    t = torch.arange(6, dtype=torch.float32)
    base = fingerprint({"a": t})
    assert fingerprint({"a": t.clone()}) == base
    assert fingerprint({"b": t}) != base
    assert fingerprint({"a": t.view(2, 3)}) != base
    assert fingerprint({"a": t.view(torch.int32)}) != base  # same bytes, other dtype


def test_head_names_are_the_classifier(tiny_model):
    base = load_base(tiny_model)
    assert base.head_names == frozenset({"classifier.weight", "classifier.bias"})
    assert set(base.head_parameters()) == base.head_names
    assert not set(base.base_names) & base.head_names
    assert base.num_base_params == sum(p.numel() for p in base.base_parameters().values())
    total = sum(p.numel() for p in base.model.parameters())
    assert total == base.num_base_params + 32 * 2 + 2


def test_num_labels_and_labels_configure_the_head(tiny_model):
    base = load_base(tiny_model, 3, labels=("entailment", "neutral", "contradiction"))
    config = base.model.config
    assert base.model.classifier.weight.shape == (3, 32)
    assert config.num_labels == 3 and config.problem_type == "single_label_classification"
    assert config.id2label == {0: "entailment", 1: "neutral", 2: "contradiction"}
    assert config.label2id["contradiction"] == 2
    assert base.labels == ("entailment", "neutral", "contradiction")
    # the mismatched pretrained head is replaced, so it counts as head, not base
    assert base.head_names == frozenset({"classifier.weight", "classifier.bias"})


def test_regression_configures_a_one_output_head(tiny_model):
    base = load_base(tiny_model, 1, regression=True)
    assert base.model.classifier.weight.shape == (1, 32)
    assert base.model.config.problem_type == "regression"
    out = base.model(input_ids=torch.tensor([[101, 2000, 102]]), labels=torch.tensor([2.5]))
    assert out.logits.shape == (1, 1) and out.loss.ndim == 0  # MSE on a float target


def _assert_one_line_error(excinfo, *needles: str) -> None:
    message = str(excinfo.value)
    assert message and "\n" not in message, message
    for needle in needles:
        assert needle in message, message


def test_load_missing_folder_is_a_one_line_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(DiffpruneError) as excinfo:
        load_base(missing)
    _assert_one_line_error(excinfo, str(missing), "does not exist")


def test_a_local_folder_is_named_by_its_absolute_path(tiny_model, monkeypatch):
    """Patches and run records carry the base's name; a relative one would not be found again
    from another working directory."""
    folder = Path(tiny_model)
    monkeypatch.chdir(folder.parent)
    assert load_base(folder.name).name == str(folder.resolve())


def test_load_non_text_model_is_a_one_line_error(tmp_path):
    from transformers import AutoModelForSequenceClassification, ViTConfig

    config = ViTConfig()
    assert type(config) not in AutoModelForSequenceClassification._model_mapping  # the premise
    config.save_pretrained(tmp_path / "vit")
    with pytest.raises(DiffpruneError) as excinfo:
        load_base(tmp_path / "vit")
    _assert_one_line_error(excinfo, "vit", "sequence classifier")


def test_load_folder_without_config_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiffpruneError) as excinfo:
        load_base(tmp_path / "empty")
    _assert_one_line_error(excinfo, "cannot load model", str(tmp_path / "empty"))


def test_load_folder_with_config_but_no_weights_is_a_one_line_error(tiny_model, tmp_path):
    folder = tmp_path / "no-weights"
    shutil.copytree(tiny_model, folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(DiffpruneError) as excinfo:
        load_base(folder)
    _assert_one_line_error(excinfo, "cannot load model")


def test_load_folder_without_tokenizer_files_is_a_one_line_error(tiny_model, tmp_path):
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(tiny_model) / name, folder / name)
    with pytest.raises(DiffpruneError) as excinfo:
        load_base(folder)
    _assert_one_line_error(excinfo, str(folder), "tokenizer files missing")


def test_max_positions_is_the_smaller_known_limit(tiny_model):
    base = load_base(tiny_model)
    assert base.tokenizer.model_max_length == 512 and base.model.config.max_position_embeddings == 160
    assert base.max_positions() == 160


# ---- any architecture: the class comes from the config, never from the name ----------------


@pytest.mark.parametrize(
    "kind, model_type, head",
    [
        ("roberta", "roberta", {"classifier.dense", "classifier.out_proj"}),
        ("distilbert", "distilbert", {"pre_classifier", "classifier"}),
    ],
)
def test_other_architectures_load_and_train(tmp_path, glue_dir, kind, model_type, head):
    from diffprune.api import train
    from diffprune.training.settings import TrainSettings

    folder = tiny_other(tmp_path / "encoder", kind)  # the name says nothing about the type
    base = load_base(folder)
    assert base.model.config.model_type == model_type
    assert {n.rsplit(".", 1)[0] for n in base.head_names} == head

    record = train(TrainSettings(
        task="MRPC", method="full", model=str(folder), data_dir=glue_dir, output=str(tmp_path / "run"),
        max_steps=2, batch_size=4, max_train_samples=8, max_eval_samples=8, max_seq_length=64,
        checkpoint_every=0, log_every=1,
    ))
    assert record["steps"] == 2
    assert record["fingerprint"] == base.fingerprint
    assert record["trainable_params"] == sum(p.numel() for p in base.model.parameters())
    saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert saved["model_type"] == model_type
    assert 0.0 <= record["score"] <= 1.0


@pytest.mark.parametrize("hub_id", ["bert-base-uncased", "google-bert/bert-base-uncased"])
def test_a_hub_id_goes_to_the_hub_not_to_the_folder_check(hub_id, monkeypatch):
    # offline here, so the hub answers with an error; it must be the hub's, not "does not exist"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DiffpruneError) as excinfo:
        load_base(hub_id)
    _assert_one_line_error(excinfo, "cannot load model", hub_id)
    assert "does not exist" not in str(excinfo.value)
