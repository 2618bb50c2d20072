"""The training loop in-process through `diffprune.api.train`: record, logs, determinism,
best-keeping, the output-folder guard, divergence, the dense baselines and the data order."""

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


def settings(model: str, glue_dir: str, output: Path, **overrides) -> TrainSettings:
    values = dict(
        task="MRPC", method="full", model=model, data_dir=glue_dir, output=str(output), seed=7,
        epochs=2, batch_size=8, max_seq_length=64, max_train_samples=16, max_eval_samples=16,
        checkpoint_every=2, log_every=1,
    )
    values.update(overrides)
    return TrainSettings(**values)


def saved_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory) -> tuple[Path, dict]:
    """One finished full-finetuning run (2 epochs of 2 steps), shared by the read-only tests."""
    out = tmp_path_factory.mktemp("reference") / "run"
    record = train(settings(tiny_model, str(GLUE_FIXTURES), out))
    return out, record


# ---- the run record and the files beside it ------------------------------------------------


def test_record_holds_the_run(reference, tiny_model):
    out, record = reference
    for key in ("model", "fingerprint", "task", "method", "settings", "dev", "evals", "trainable_params",
                "seconds", "peak_rss_mb", "device"):
        assert key in record, key
    assert record["model"] == tiny_model and record["fingerprint"].startswith("sha256:")
    assert record["task"] == "MRPC" and record["method"] == "full"
    assert record["settings"]["seed"] == 7 and record["settings"]["batch_size"] == 8
    assert record["steps"] == 4 and record["train_examples"] == 16
    assert [(e["epoch"], e["step"]) for e in record["evals"]] == [(1.0, 2), (2.0, 4)]  # one per epoch
    assert set(record["dev"]) >= {"f1", "accuracy", "score"} and record["score"] == record["dev"]["score"]
    assert record["seconds"] > 0 and record["peak_rss_mb"] > 50 and record["device"].startswith("cpu")
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


# ---- the output-folder guard ----------------------------------------------------------------


def test_second_run_into_a_used_folder_is_refused(reference, tiny_model, glue_dir):
    out, _ = reference
    with pytest.raises(DiffpruneError, match="--overwrite"):
        train(settings(tiny_model, glue_dir, out))
    assert (out / "run.json").exists()


def test_overwrite_replaces_the_run(tiny_model, glue_dir, tmp_path):
    out = tmp_path / "run"
    train(settings(tiny_model, glue_dir, out, max_steps=1, seed=1))
    first = saved_weights(out)
    record = train(settings(tiny_model, glue_dir, out, max_steps=1, seed=2, overwrite=True))
    assert record["settings"]["seed"] == 2
    assert json.loads((out / "run.json").read_text())["settings"]["seed"] == 2
    assert json.loads((out / "settings.json").read_text())["seed"] == 2
    assert not torch.equal(first["classifier.weight"], saved_weights(out)["classifier.weight"])
    # the run that replaces it saves nothing: the old model must not pass for its artifact
    train(settings(tiny_model, glue_dir, out, max_steps=1, method="bitfit", save_model=False, overwrite=True))
    assert not (out / "model").exists()
    with pytest.raises(DiffpruneError, match="holds no patch.safetensors"):
        evaluate_run(out, data_dir=glue_dir)


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_without_a_run_keeps_what_the_user_put_there(tiny_model, glue_dir, tmp_path, overwrite):
    """A project folder that holds the user's own `model/` (here, the base itself) is not a run:
    --overwrite has nothing to replace there, and no run may write its artifact over it."""
    import shutil

    project = tmp_path / "project"
    shutil.copytree(tiny_model, project / "model")
    before = sorted(p.name for p in (project / "model").iterdir())
    with pytest.raises(DiffpruneError, match="holds no run but has a 'model'"):
        train(settings(str(project / "model"), glue_dir, project, max_steps=1, overwrite=overwrite))
    assert sorted(p.name for p in (project / "model").iterdir()) == before
    assert not (project / "settings.json").exists()


def test_an_output_that_is_a_file_is_a_clear_error(tiny_model, glue_dir, tmp_path):
    (tmp_path / "taken").write_text("mine")
    with pytest.raises(DiffpruneError, match="is a file, not a folder"):
        train(settings(tiny_model, glue_dir, tmp_path / "taken"))
    assert (tmp_path / "taken").read_text() == "mine"


def test_a_missing_or_broken_adapter_is_a_clear_error(tiny_model, glue_dir, tmp_path):
    out = tmp_path / "run"
    train(settings(tiny_model, glue_dir, out, max_steps=1, method="lora"))
    (out / "adapter" / "adapter_config.json").unlink()
    with pytest.raises(DiffpruneError, match="cannot load the lora adapter"):
        evaluate_run(out, data_dir=glue_dir)


def test_resume_needs_a_run(tiny_model, glue_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiffpruneError, match="no run to resume"):
        train(settings(tiny_model, glue_dir, tmp_path / "empty", resume=True))


def test_resume_refuses_a_changed_setting(reference, tiny_model, glue_dir):
    out, _ = reference
    before = (out / "settings.json").read_text()
    with pytest.raises(DiffpruneError, match="'lr'") as excinfo:
        train(settings(tiny_model, glue_dir, out, lr=1e-3, resume=True))
    assert "--resume" in str(excinfo.value)
    assert (out / "settings.json").read_text() == before


def test_resume_takes_an_option_added_since_the_run_at_its_default(tiny_model, glue_dir, tmp_path):
    """A run checkpointed before an option existed resumes under a diffprune that has it, as
    long as the option keeps its default (which, for every new option, is the old behaviour)."""
    out = tmp_path / "run"
    train(settings(tiny_model, glue_dir, out, method="diff-struct", epochs=1, checkpoint_every=1),
          {"budget": 0.01, "fixed_epochs": 0})
    saved = json.loads((out / "settings.json").read_text())
    del saved["method_options"]["steer"]  # as written before --steer existed
    del saved["warmup_ratio"]  # and before a run setting existed (it was left at its default)
    (out / "settings.json").write_text(json.dumps(saved))
    before = (out / "settings.json").read_text()

    with pytest.raises(DiffpruneError, match="'method_options'"):
        train(settings(tiny_model, glue_dir, out, method="diff-struct", epochs=1, checkpoint_every=1, resume=True),
              {"budget": 0.01, "fixed_epochs": 0, "steer": "shift"})
    assert (out / "settings.json").read_text() == before

    record = train(settings(tiny_model, glue_dir, out, method="diff-struct", epochs=1, checkpoint_every=1,
                            resume=True), {"budget": 0.01, "fixed_epochs": 0})
    assert record["method_options"]["steer"] == "lambda"
    assert json.loads((out / "settings.json").read_text())["method_options"]["steer"] == "lambda"


def test_an_interrupted_lookahead_controller_resumes_to_the_uninterrupted_run(tiny_model, glue_dir, tmp_path,
                                                                               monkeypatch):
    """--controller-lookahead steers on the gate logits' moving average: the checkpoint must
    carry it, or the resumed run restarts at zero velocity and steers elsewhere."""
    from diffprune.methods.diff.steering import DensitySteering

    options = {"budget": 0.01, "fixed_epochs": 0, "controller_lookahead": 5, "target_density": 0.5}
    run = dict(method="diff", epochs=2, batch_size=4, max_train_samples=24, checkpoint_every=2)
    whole = train(settings(tiny_model, glue_dir, tmp_path / "whole", **run), dict(options))

    after_step = DensitySteering.after_step

    def interrupted(self, step: int, total: int) -> None:
        if step == 9:  # past the checkpoint at step 8, with lambda already moving
            raise KeyboardInterrupt
        after_step(self, step, total)

    monkeypatch.setattr(DensitySteering, "after_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(settings(tiny_model, glue_dir, tmp_path / "killed", **run), dict(options))
    monkeypatch.setattr(DensitySteering, "after_step", after_step)
    resumed = train(settings(tiny_model, glue_dir, tmp_path / "killed", resume=True, **run), dict(options))

    def steering_log(folder: Path) -> list[tuple[str, str, str]]:
        with open(folder / "log.csv", newline="") as f:
            return [(r["step"], r["name"], r["value"]) for r in csv.DictReader(f)
                    if r["name"] in ("l0_lambda", "heading_density")]

    logged = steering_log(tmp_path / "whole")
    assert {name for _, name, _ in logged} == {"l0_lambda", "heading_density"}
    assert len({value for _, name, value in logged if name == "l0_lambda"}) > 2  # lambda did move
    assert steering_log(tmp_path / "killed") == logged
    assert resumed["evals"] == whole["evals"]
    a, b = load_file(tmp_path / "whole" / "patch.safetensors"), load_file(tmp_path / "killed" / "patch.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_fixed_mask_phase_checkpoints_no_logit_average(tiny_model, glue_dir, tmp_path):
    """The lookahead's average holds a float per gate (91 MB on MiniLM); after the projection
    nothing reads it, so the fixed-mask phase's checkpoints leave it out."""
    out = tmp_path / "run"
    train(settings(tiny_model, glue_dir, out, method="diff", epochs=1, checkpoint_every=0),
          {"budget": 0.01, "controller_lookahead": 2})
    from diffprune.training.checkpoint import latest_checkpoint

    kept = load_file(latest_checkpoint(out) / "trainable.safetensors")
    assert "values" in kept and "logit_average" not in kept and "l0_lambda" in kept


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


def test_a_bad_model_path_leaves_the_folder_unclaimed(tiny_model, glue_dir, tmp_path):
    """Bad input loses nothing: the failed run does not claim the folder, so a retry needs no --overwrite."""
    out = tmp_path / "run"
    with pytest.raises(DiffpruneError, match="does not exist"):
        train(TrainSettings(task="MRPC", model=str(tmp_path / "no-such-model"), data_dir=glue_dir, output=str(out)))
    assert not (out / "settings.json").exists()
    record = train(TrainSettings(task="MRPC", model=tiny_model, data_dir=glue_dir, output=str(out), max_steps=1,
                                 batch_size=8, max_eval_samples=8))
    assert record["steps"] == 1


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


@pytest.mark.parametrize("damaged", ["state.pt", "trainable.safetensors", "progress.json"])
def test_resume_from_a_damaged_checkpoint_is_a_clear_error(reference, tiny_model, glue_dir, tmp_path, damaged):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    data = (latest / damaged).read_bytes()
    (latest / damaged).write_bytes(data[: len(data) // 2])  # a half-written file
    with pytest.raises(DiffpruneError, match="unreadable") as excinfo:
        train(settings(tiny_model, glue_dir, out, resume=True))
    assert damaged in str(excinfo.value) or str(latest) in str(excinfo.value)


@pytest.mark.parametrize("bad, message", [
    ({"log_every": 0}, "--log-every"), ({"max_train_samples": -3}, "--max-train-samples"),
    ({"max_grad_norm": -1.0}, "--max-grad-norm"), ({"batch_size": 8.5}, "'batch_size' must be int"),
    ({"save_model": "no"}, "'save_model' must be bool"), ({"seed": True}, "'seed' must be int"),
    ({"seed": -1}, "--seed must be in"), ({"lr": float("nan")}, "'lr' must be a finite number"),
])
def test_bad_settings_are_refused_before_anything_runs(bad, message, tiny_model, glue_dir, tmp_path):
    with pytest.raises(DiffpruneError, match=message):
        settings(tiny_model, glue_dir, tmp_path / "run", **bad)
    assert not (tmp_path / "run").exists()


def test_diff_pruning_under_fsdp_is_refused_before_anything_runs(tiny_model, glue_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for an FSDP config
    with pytest.raises(DiffpruneError, match="method 'diff-struct' cannot train under FSDP.*DDP"):
        train(settings(tiny_model, glue_dir, tmp_path / "run", method="diff-struct"))
    assert not (tmp_path / "run").exists()


def test_a_run_started_again_from_its_first_step_logs_each_step_once(tmp_path):
    """--resume of a run killed before its first checkpoint starts over: the earlier try's
    TensorBoard events go, as its CSV rows do."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from diffprune.training.logger import RunLogger

    for value in (1.0, 2.0):  # the first try, then the run started again
        logger = RunLogger(tmp_path, enabled=True)
        for step in (1, 2):
            logger.log(step, "l0", step / 2, {"loss": value})
        logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("l0/loss")] == [(1, 2.0), (2, 2.0)]
    with open(tmp_path / "log.csv", newline="") as f:
        assert [(r["step"], r["value"]) for r in csv.DictReader(f)] == [("1", "2.0"), ("2", "2.0")]


def test_resume_may_change_whether_the_artifact_is_saved(reference, tiny_model, glue_dir, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    record = train(settings(tiny_model, glue_dir, out, save_model=False, resume=True))
    assert record["score"] == reference[1]["score"]


def test_inputs_the_model_cannot_take_are_refused_before_anything_runs(tiny_model, glue_dir, tmp_path):
    with pytest.raises(DiffpruneError, match="--max-seq-length 200 is longer than the 160 tokens"):
        train(settings(tiny_model, glue_dir, tmp_path / "long", max_seq_length=200))
    assert not (tmp_path / "long").exists()


def test_an_empty_dev_set_is_refused_before_anything_runs(tiny_model, glue_dir, tmp_path):
    import shutil

    glue = tmp_path / "glue"
    shutil.copytree(Path(glue_dir) / "MRPC", glue / "MRPC")
    dev = glue / "MRPC" / "dev.tsv"
    dev.write_text(dev.read_text(encoding="utf-8-sig").splitlines()[0] + "\n", encoding="utf-8")
    with pytest.raises(DiffpruneError, match="the MRPC dev set is empty"):
        train(settings(tiny_model, str(glue), tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_an_empty_training_set_is_refused(tiny_model, tmp_path):
    import shutil

    glue = tmp_path / "glue"
    shutil.copytree(GLUE_FIXTURES / "MRPC", glue / "MRPC")
    train_file = glue / "MRPC" / "train.tsv"
    train_file.write_text(train_file.read_text(encoding="utf-8-sig").splitlines()[0] + "\n")  # the header alone
    with pytest.raises(DiffpruneError, match="MRPC training set is empty"):
        train(settings(tiny_model, str(glue), tmp_path / "run"))


def test_checkpoint_restores_each_process_its_own_rng(tmp_path):
    """Each process draws its own dropout and gate noise, so each must get its own state back."""
    from diffprune.training.checkpoint import Progress, load_checkpoint, rng_state, save_checkpoint

    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([weight])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    states = []
    for seed in (1, 2):  # as if gathered from two processes
        torch.manual_seed(seed)
        states.append(rng_state())
    path = save_checkpoint(tmp_path, Progress(global_step=5), {"w": weight.detach()}, None, optimizer, scheduler, states)
    checkpoint = load_checkpoint(path)
    draws = []
    for process in (0, 1, 2):  # a third process (more than the run had) takes the main one's
        checkpoint.restore_rng(process)
        draws.append(torch.rand(3))
    torch.manual_seed(2)
    assert torch.equal(draws[1], torch.rand(3)) and not torch.equal(draws[0], draws[1])
    assert torch.equal(draws[2], draws[0])


def test_a_gpu_checkpoint_resumes_on_a_machine_with_fewer_gpus(tmp_path, monkeypatch):
    """Each process saves its own device's generator only, and restores it onto its current
    device, so a run made on 4 GPUs (or an older checkpoint holding all 4) resumes on 1."""
    from diffprune.training.checkpoint import Progress, load_checkpoint, rng_state, save_checkpoint

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.full((8,), 7, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state: restored.append(state.clone()))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("restored every device"))
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([weight])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    assert len(rng_state()["cuda"]) == 1
    older = {"cpu": torch.get_rng_state(), "cuda": [torch.full((8,), i, dtype=torch.uint8) for i in range(4)]}
    for states in ([rng_state()] * 4, [older]):
        path = save_checkpoint(tmp_path, Progress(global_step=5), {"w": weight.detach()}, None, optimizer,
                               scheduler, states)
        load_checkpoint(path).restore_rng(0)
    assert [int(s[0]) for s in restored] == [7, 0]


def test_a_checkpoint_replaces_the_last_one_and_the_leftovers_of_a_killed_write(tmp_path):
    from diffprune.training.checkpoint import Progress, latest_checkpoint, save_checkpoint

    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([weight])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save_checkpoint(tmp_path, Progress(global_step=5), {"w": weight.detach()}, None, optimizer, scheduler)
    killed_write = tmp_path / "checkpoints" / ".step-10.x1y2.tmp"  # what a SIGKILL mid-write leaves
    killed_write.mkdir()
    (killed_write / "trainable.safetensors").write_bytes(b"half")
    path = save_checkpoint(tmp_path, Progress(global_step=10), {"w": weight.detach()}, None, optimizer, scheduler)
    assert latest_checkpoint(tmp_path) == path
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-10"]


def test_a_checkpoint_keeps_the_fp16_loss_scale(tmp_path):
    from diffprune.training.checkpoint import Progress, load_checkpoint, save_checkpoint

    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([weight])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(weight.sum()).backward()
    scaler.step(optimizer)
    scaler.update()  # the scale is now a tensor the scaler owns, with its growth tracker
    path = save_checkpoint(tmp_path, Progress(global_step=1), {"w": weight.detach()}, None, optimizer, scheduler,
                           scaler=scaler)
    restored = torch.amp.GradScaler("cpu")
    restored.load_state_dict(load_checkpoint(path).state["scaler"])
    assert restored.get_scale() == scaler.get_scale() == 1024.0
    assert restored.state_dict() == scaler.state_dict()


def test_a_step_the_loss_scaler_skips_leaves_the_schedule_where_it_was():
    """fp16 loss scaling skips a step whose scaled gradients overflow; the learning rate
    schedule must not advance for it. (fp16 needs a GPU; the CPU scaler behaves the same.)"""
    from accelerate import Accelerator

    from diffprune.training.loop import train_step
    from diffprune.training.phases import ParamGroup, Phase, build_optimizer, build_scheduler

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, factor):  # the loss is finite; its gradient, times the loss scale, is not
            return SimpleNamespace(loss=(factor * self.w).sum())

    acc = Accelerator(cpu=True)
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    model = Scaled()
    groups = [ParamGroup("body", [model.w], lr=0.1, schedule="linear")]
    phase = Phase("finetune", lambda: groups, epochs=1)
    optimizer = build_optimizer(groups)
    scheduler = build_scheduler(optimizer, groups, total_steps=10, warmup_ratio=0.0)
    optimizer = acc.prepare_optimizer(optimizer)

    _, stepped = train_step(acc, model, phase, groups, optimizer, scheduler, {"factor": torch.tensor([1e34])},
                            1.0, max_grad_norm=0.0)
    assert not stepped and model.w.item() == 1.0 and scheduler.last_epoch == 0
    _, stepped = train_step(acc, model, phase, groups, optimizer, scheduler, {"factor": torch.tensor([1.0])},
                            1.0, max_grad_norm=0.0)
    assert stepped and model.w.item() < 1.0 and scheduler.last_epoch == 1
