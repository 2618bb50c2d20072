"""The training loop's guards, in-process: the output folder, resume and its checkpoints, and the
settings and inputs refused before anything runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import GLUE_FIXTURES
from diffprune.api import evaluate_run, train
from diffprune.errors import DiffpruneError
from diffprune.training.settings import TrainSettings
from training_helpers import finished_run, saved_weights, settings


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory) -> tuple[Path, dict]:
    """One finished full-finetuning run, shared by the read-only tests."""
    return finished_run(tiny_model, tmp_path_factory.mktemp("reference"))


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


def test_a_bad_model_path_leaves_the_folder_unclaimed(tiny_model, glue_dir, tmp_path):
    """Bad input loses nothing: the failed run does not claim the folder, so a retry needs no --overwrite."""
    out = tmp_path / "run"
    with pytest.raises(DiffpruneError, match="does not exist"):
        train(TrainSettings(task="MRPC", model=str(tmp_path / "no-such-model"), data_dir=glue_dir, output=str(out)))
    assert not (out / "settings.json").exists()
    record = train(TrainSettings(task="MRPC", model=tiny_model, data_dir=glue_dir, output=str(out), max_steps=1,
                                 batch_size=8, max_eval_samples=8))
    assert record["steps"] == 1


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


def test_the_cpu_time_of_a_run_leaves_out_its_pauses_and_carries_across_a_resume():
    import time

    from diffprune.training.checkpoint import Progress

    progress = Progress(seconds=10.0, cpu_seconds=4.0)  # as a checkpoint left it
    clock = progress.clock()
    time.sleep(0.3)  # a stopped process: the wall clock runs on, the CPU clock does not
    progress.tick(clock)
    assert 10.3 <= progress.seconds < 12 and 4.0 <= progress.cpu_seconds < 4.1
