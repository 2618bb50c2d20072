"""The training loop in-process through `diffprune.api.train`: record, logs, determinism,
best-keeping, divergence, the dense baselines and the data order."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import GLUE_FIXTURES
from diffprune.api import evaluate_run, train
from diffprune.errors import DiffpruneError, TrainingDiverged
from diffprune.training.loop import epoch_order, loss_summary, shard
from diffprune.training.settings import TrainSettings
from training_helpers import finished_run, saved_weights, settings


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory) -> tuple[Path, dict]:
    """One finished full-finetuning run, shared by the read-only tests."""
    return finished_run(tiny_model, tmp_path_factory.mktemp("reference"))


# ---- the run record and the files beside it ------------------------------------------------


def test_record_holds_the_run(reference, tiny_model):
    out, record = reference
    for key in ("model", "fingerprint", "task", "method", "settings", "dev", "evals", "trainable_params",
                "seconds", "cpu_seconds", "peak_rss_mb", "device"):
        assert key in record, key
    assert record["model"] == tiny_model and record["fingerprint"].startswith("sha256:")
    assert record["task"] == "MRPC" and record["method"] == "full"
    assert record["settings"]["seed"] == 7 and record["settings"]["batch_size"] == 8
    assert record["steps"] == 4 and record["train_examples"] == 16
    assert [(e["epoch"], e["step"]) for e in record["evals"]] == [(1.0, 2), (2.0, 4)]  # one per epoch
    assert set(record["dev"]) >= {"f1", "accuracy", "score"} and record["score"] == record["dev"]["score"]
    assert record["seconds"] > 0 and record["cpu_seconds"] > 0 and record["peak_rss_mb"] > 50 and record["device"].startswith("cpu")
    assert json.loads((out / "run.json").read_text()) == json.loads(json.dumps(record))


def test_log_csv_tensorboard_and_settings(reference):
    out, record = reference
    with open(out / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    names = {r["name"] for r in rows}
    assert {"task_loss", "loss", "lr", "dev_score"} <= names
    for name in ("task_loss", "loss", "lr"):  # log_every=1: one row per step
        steps = [int(r["step"]) for r in rows if r["name"] == name]
        assert steps == [1, 2, 3, 4], (name, steps)
    assert all(math.isfinite(float(r["value"])) for r in rows)
    lrs = [float(r["value"]) for r in rows if r["name"] == "lr"]
    assert lrs[-1] < max(lrs)  # the linear schedule decays

    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0

    saved = json.loads((out / "settings.json").read_text())
    assert saved["seed"] == 7 and saved["epochs"] == 2 and saved["method"] == "full"
    assert saved["method_options"] == {}
    assert "output" not in saved and "resume" not in saved  # run control, not computation

    assert (out / "checkpoints" / "latest").read_text().strip() == "step-4"
    progress = json.loads((out / "checkpoints" / "step-4" / "progress.json").read_text())
    assert progress["global_step"] == 4 and len(progress["evals"]) == 2


def test_record_holds_the_majority_class_score_and_the_data_folder(reference):
    _, record = reference
    # the 16 dev rows scored: 10 paraphrases, so "paraphrase" throughout has F1 2 * 10 / (10 + 16)
    assert record["majority_class"] == pytest.approx({"f1": 20 / 26, "accuracy": 10 / 16, "score": 20 / 26})
    assert record["data_dir"] == str(GLUE_FIXTURES.resolve())


def test_the_progress_bar_shows_the_task_loss_and_the_other_terms_apart():
    # diff pruning's L0 phase: the penalty climbs into the hundreds while the task loss falls
    terms = {"loss": 355.61, "task_loss": 0.61234, "l0_penalty": 355.0}
    assert loss_summary(terms) == "task_loss 0.6123  (l0_penalty 355)"
    assert loss_summary({"loss": 0.5, "task_loss": 0.5}) == "task_loss 0.5000"


def test_eval_of_a_run_reads_the_data_folder_the_run_read(reference, tmp_path, monkeypatch):
    """Not $GLUE_DIR, not the hub (30 s of retries offline): the folder the record names."""
    import shutil

    import diffprune.glue.data

    def no_hub(*args, **kwargs):
        raise AssertionError("went to the hub")

    monkeypatch.setattr(diffprune.glue.data, "load_hub_split", no_hub)
    monkeypatch.delenv("GLUE_DIR", raising=False)
    out, record = reference
    full_dev = evaluate_run(out)  # every dev row (the run scored the first 16)
    assert full_dev == evaluate_run(out, data_dir=str(GLUE_FIXTURES))

    moved = tmp_path / "run"  # a copy whose data folder is gone
    shutil.copytree(out, moved)
    saved = json.loads((moved / "run.json").read_text())
    (moved / "run.json").write_text(json.dumps({**saved, "data_dir": str(tmp_path / "gone")}))
    with pytest.raises(DiffpruneError, match=f"the run read its data from {tmp_path / 'gone'}, which is no "
                                             "longer there; pass --data-dir"):
        evaluate_run(moved)
    assert evaluate_run(moved, data_dir=str(GLUE_FIXTURES)) == full_dev

    del saved["data_dir"]  # a run recorded before the folder was: its settings name it as given
    (moved / "run.json").write_text(json.dumps(saved))
    assert evaluate_run(moved) == full_dev


# ---- determinism ----------------------------------------------------------------------------


def test_same_seed_same_run_other_seed_other_run(reference, tiny_model, glue_dir, tmp_path):
    out, record = reference
    first = saved_weights(out)

    again = train(settings(tiny_model, glue_dir, tmp_path / "again"))
    assert again["score"] == record["score"] and again["evals"] == record["evals"]
    second = saved_weights(tmp_path / "again")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)

    other = train(settings(tiny_model, glue_dir, tmp_path / "other", seed=8))
    third = saved_weights(tmp_path / "other")
    assert not torch.equal(first["classifier.weight"], third["classifier.weight"])  # head init
    assert not torch.equal(first["bert.encoder.layer.0.attention.self.query.weight"],
                           third["bert.encoder.layer.0.attention.self.query.weight"])  # the updates
    assert other["settings"]["seed"] == 8


# ---- keep the best epoch --------------------------------------------------------------------


def test_keep_best_restores_the_best_epoch(tiny_model, glue_dir, tmp_path):
    # STS-B's correlation moves every epoch; at this lr the first epoch is the best one.
    out = tmp_path / "stsb"
    record = train(settings(tiny_model, glue_dir, out, task="STS-B", lr=1e-2, epochs=4, max_eval_samples=None))
    scores = [e["score"] for e in record["evals"]]
    assert len(scores) == 4
    assert scores[-1] < max(scores), f"premise: the last epoch should not be the best here ({scores})"
    best = record["evals"][scores.index(max(scores))]
    assert record["score"] == max(scores)
    assert record["dev"] == {k: v for k, v in best.items() if k not in ("phase", "epoch", "step")}
    # the saved model is the best epoch's, not the last one's
    assert evaluate_run(out, data_dir=glue_dir)["score"] == pytest.approx(max(scores), abs=1e-6)


# ---- divergence -----------------------------------------------------------------------------


# What goes wrong after step 3, and the step that reports it: a weight that becomes inf is
# seen at once; an inf gradient at the next step, before its update writes NaN weights.
EXPLOSIONS = {"weights": 3, "gradient": 4}


@pytest.fixture(params=sorted(EXPLOSIONS))
def exploding_method(request):
    """A test-only method that diverges in its third step: its head weight becomes inf, or its
    gradient does (a finite loss whose step would write NaN weights, and checkpoint them)."""
    from diffprune.methods.full import single_phase
    from diffprune.methods.registry import METHODS, Method, register

    @register
    class Explode(Method):
        name = "test-explode"
        summary = "test only: diverges after three steps"

        def prepare(self, base):
            base.model.requires_grad_(True)
            return base.model

        def phases(self, model, base, s):
            phase = single_phase(model, base, s, self.lr(s))

            def after_step(step: int, total: int) -> None:
                if step == 3 and request.param == "weights":
                    with torch.no_grad():
                        model.classifier.weight.fill_(float("inf"))
                if step == 3 and request.param == "gradient":
                    model.classifier.weight.register_hook(lambda grad: grad * float("inf"))

            phase.after_step = after_step
            return [phase]

    try:
        yield Explode.name, EXPLOSIONS[request.param]
    finally:
        METHODS.pop(Explode.name, None)


def test_diverged_run_stops_and_keeps_the_last_checkpoint(exploding_method, tiny_model, glue_dir, tmp_path):
    method, step = exploding_method
    out = tmp_path / "boom"
    # 24 examples in batches of 4: 6 steps per epoch, so only checkpoint_every writes steps 2 and 4
    with pytest.raises(TrainingDiverged) as excinfo:
        train(settings(tiny_model, glue_dir, out, method=method, batch_size=4, max_train_samples=24))
    kept = out / "checkpoints" / "step-2"
    assert f"at step {step} (phase finetune); the last finite checkpoint is {kept} (step 2)" in str(excinfo.value)
    assert "\n" not in str(excinfo.value)
    assert not (out / "run.json").exists()

    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step-2"
    assert [p.name for p in checkpoints.glob("step-*")] == ["step-2"]
    progress = json.loads((checkpoints / "step-2" / "progress.json").read_text())
    assert progress["global_step"] == 2 and progress["phase_step"] == 2
    state = load_file(checkpoints / "step-2" / "trainable.safetensors")
    assert torch.isfinite(state["classifier.weight"]).all()


def test_a_checkpoint_is_never_written_from_non_finite_state(tiny_model, glue_dir, tmp_path):
    """The steps check the trained parameters; a checkpoint checks all it would hold, here a
    buffer beside them (as diff pruning's penalty weight is) that became NaN."""
    from diffprune.methods.full import single_phase
    from diffprune.methods.registry import METHODS, Method, register

    @register
    class Drift(Method):
        name = "test-drift"
        summary = "test only: a checkpointed buffer becomes NaN at step 3"

        def prepare(self, base):
            base.model.requires_grad_(True)
            base.model.register_buffer("drift", torch.zeros(2))
            return base.model

        def trainable_state(self, model):
            return {**super().trainable_state(model), "drift": model.drift}

        def phases(self, model, base, s):
            phase = single_phase(model, base, s, self.lr(s))
            phase.after_step = lambda step, total: model.drift.fill_(float("nan")) if step == 3 else None
            return [phase]

    out = tmp_path / "drift"
    try:
        with pytest.raises(TrainingDiverged) as excinfo:  # checkpoints at steps 2 and 4
            train(settings(tiny_model, glue_dir, out, method=Drift.name, batch_size=4, max_train_samples=24))
    finally:
        METHODS.pop(Drift.name, None)
    assert str(excinfo.value).startswith("training diverged: drift is not finite at step 4")
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-2"]
    assert torch.equal(load_file(out / "checkpoints" / "step-2" / "trainable.safetensors")["drift"], torch.zeros(2))


# ---- the dense baselines: trainable parameters, save -> load_artifact -------------------------


def _expected_trainable(method: str, tiny_model: str) -> int:
    from diffprune.base import load_base

    base = load_base(tiny_model)
    head = sum(p.numel() for p in base.head_parameters().values())
    if method == "full":
        return sum(p.numel() for p in base.model.parameters())
    if method == "bitfit":
        return head + sum(p.numel() for n, p in base.base_parameters().items() if n.endswith(".bias"))
    hidden, layers, r = 32, 2, 8  # PEFT adapts BERT's query and value: A (r x h) and B (h x r) each
    return head + layers * 2 * (r * hidden + hidden * r)


@pytest.mark.parametrize("method", ["full", "bitfit", "lora"])
def test_method_trains_saves_and_loads(method, tiny_model, glue_dir, tmp_path):
    out = tmp_path / method
    record = train(settings(tiny_model, glue_dir, out, method=method, epochs=1, max_eval_samples=None))
    expected = _expected_trainable(method, tiny_model)
    assert record["trainable_params"] == expected
    if method != "full":
        assert record["trainable_params"] < 0.05 * _expected_trainable("full", tiny_model)
    if method == "lora":
        adapter = load_file(out / "adapter" / "adapter_model.safetensors")
        assert all("lora_A" in k or "lora_B" in k or "classifier" in k for k in adapter), sorted(adapter)
        assert sum(t.numel() for t in adapter.values()) == expected
    for name in record["files"]:
        assert (out / name).is_file()

    metrics = evaluate_run(out, data_dir=glue_dir)
    assert metrics.keys() == record["dev"].keys()
    for key, value in record["dev"].items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key


# ---- the data order -------------------------------------------------------------------------


def test_epoch_order_is_a_pure_function():
    a = epoch_order(30, 8, seed=3, phase=0, epoch=1)
    assert a == epoch_order(30, 8, seed=3, phase=0, epoch=1)
    torch.manual_seed(123)  # the global RNG plays no part
    assert a == epoch_order(30, 8, seed=3, phase=0, epoch=1)
    assert [len(b) for b in a] == [8, 8, 8, 6]
    assert sorted(i for b in a for i in b) == list(range(30))  # every index once
    assert a != epoch_order(30, 8, seed=3, phase=0, epoch=2)
    assert a != epoch_order(30, 8, seed=4, phase=0, epoch=1)
    assert a != epoch_order(30, 8, seed=3, phase=1, epoch=1)


def test_epoch_order_grouped_by_length_pads_less_and_stays_random():
    g = torch.Generator().manual_seed(0)
    n, size = 5000, 16
    lengths = torch.randint(10, 120, (n,), generator=g).tolist()
    plain = epoch_order(n, size, seed=1, phase=0, epoch=0)
    grouped = epoch_order(n, size, seed=1, phase=0, epoch=0, lengths=lengths)
    assert grouped == epoch_order(n, size, seed=1, phase=0, epoch=0, lengths=lengths)
    assert sorted(i for b in grouped for i in b) == list(range(n))  # every index once
    assert grouped != epoch_order(n, size, seed=1, phase=0, epoch=1, lengths=lengths)

    def padded(batches):
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    assert padded(grouped) < 0.75 * padded(plain)  # uniform lengths: about 1.5x less padding
    # Batches in random order, not longest first across the epoch.
    longest = [max(lengths[i] for i in b) for b in grouped]
    assert longest != sorted(longest, reverse=True)


def test_shard_partitions_each_global_batch():
    processes = [SimpleNamespace(process_index=i, num_processes=2) for i in range(2)]
    for batch in epoch_order(30, 8, seed=0, phase=0, epoch=0):
        parts = [shard(batch, p) for p in processes]
        assert sorted(parts[0] + parts[1]) == sorted(batch)
        assert not set(parts[0]) & set(parts[1])
        assert abs(len(parts[0]) - len(parts[1])) <= 1
    single = SimpleNamespace(process_index=0, num_processes=1)
    assert shard([5, 1, 4], single) == [5, 1, 4]


@pytest.mark.parametrize("size", [7, 3, 1])
def test_weighted_shares_average_to_the_global_mean(size):
    """DDP averages the processes' losses: weighted, that average is the global batch's mean."""
    from diffprune.training.loop import shard_with_weight

    losses = torch.arange(size, dtype=torch.float64) + 1  # one loss per example of the global batch
    shares = [shard_with_weight(list(range(size)), SimpleNamespace(process_index=i, num_processes=2)) for i in (0, 1)]
    assert all(mine for mine, _ in shares)  # every process runs a batch, even with one example in all
    ddp_average = sum(weight * losses[mine].mean() for mine, weight in shares) / 2
    assert ddp_average.item() == pytest.approx(losses.mean().item())
    assert shard_with_weight([4, 2], SimpleNamespace(process_index=0, num_processes=1)) == ([4, 2], 1.0)


def test_peft_trains_the_head_as_its_own_group_and_nothing_else_dense(tiny_model, tmp_path):
    """A head part inside the encoder (here a pooler the checkpoint lacks) must not make PEFT
    train the whole encoder; and the head PEFT renames still gets --head-lr."""
    import shutil

    from safetensors.torch import save_file

    from diffprune.base import load_base
    from diffprune.methods import build_method

    folder = tmp_path / "no-pooler"
    shutil.copytree(tiny_model, folder)
    state = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in state.items() if "pooler" not in k}, folder / "model.safetensors")
    base = load_base(str(folder), 2)
    assert "bert.pooler.dense.weight" in base.head_names

    method = build_method("lora", {})
    model = method.prepare(base)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or ".modules_to_save." in n for n in trained), sorted(trained)
    assert any("pooler" in n for n in trained) and any("classifier" in n for n in trained)
    assert not any(("encoder" in n or "embeddings" in n) and "lora_" not in n for n in trained)

    groups = method.phases(model, base, TrainSettings(task="MRPC", lr=1e-3, head_lr=1e-2))[0].param_groups()
    head = {id(p) for g in groups if g.name.startswith("head") for p in g.params}
    assert head == {id(p) for n, p in model.named_parameters() if n in trained and "lora_" not in n}
    assert {g.lr for g in groups if g.name.startswith("head")} == {1e-2}
