"""Command line: a thin layer over diffprune.api.

Options are generated from the settings dataclass and from every registered method's options
dataclass, so the help text lives in one place and a new method needs no edit here. Settings
come from `--config FILE` (JSON or TOML) and from flags; flags win.
"""

from __future__ import annotations

import json
import sys
import tomllib
import warnings
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import click

from diffprune.errors import DiffpruneError, DiffpruneWarning
from diffprune.methods import METHODS
from diffprune.training.settings import TrainSettings

_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "list[str]": str}


def _click_option(f, default_text: str | None = None) -> click.Option:
    kind = f.type.replace(" | None", "").replace("None | ", "")
    flag = "--" + f.name.replace("_", "-")
    default = None if f.default is MISSING else f.default
    if kind == "bool":
        return click.Option([f"{flag}/--no-{flag[2:]}"], default=None, help=f.metadata["help"])
    if default_text is None and default not in (None, "", []):
        default_text = str(default)
    return click.Option([flag], type=_TYPES[kind], default=None, help=f.metadata["help"]
                        + (f" [default: {default_text}]" if default_text else ""))


def _method_fields() -> dict[str, Any]:
    """Every method option by name (methods may share one, like a budget)."""
    found: dict[str, Any] = {}
    for cls in METHODS.values():
        for f in fields(cls.Config):
            found.setdefault(f.name, f)
    return found


def _method_option(f) -> click.Option:
    """A method option's flag; where methods that share it differ in its default, each one's."""
    defaults = {m: g.default for m, cls in sorted(METHODS.items()) for g in fields(cls.Config) if g.name == f.name}
    if len(set(map(str, defaults.values()))) == 1:
        return _click_option(f)
    return _click_option(f, ", ".join(f"{d} ({m})" for m, d in defaults.items()))


def _load_config(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    p = Path(path)
    try:
        text = p.read_text()
        data = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
    except FileNotFoundError:
        raise DiffpruneError(f"config file {p} does not exist")
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise DiffpruneError(f"config file {p} is not valid {'TOML' if p.suffix == '.toml' else 'JSON'}: {e}")
    if not isinstance(data, dict):
        raise DiffpruneError(f"config file {p} must hold a table of settings")
    return {k.replace("-", "_"): v for k, v in data.items()}


def split_settings(values: dict[str, Any]) -> tuple[TrainSettings, dict[str, Any]]:
    """Separate run settings from method options; reject names that are neither."""
    setting_names = {f.name for f in fields(TrainSettings)}
    method_names = set(_method_fields())
    unknown = sorted(set(values) - setting_names - method_names)
    if unknown:
        raise DiffpruneError(f"unknown setting '{unknown[0]}' (see `diffprune train --help`)")
    settings = TrainSettings(**{k: v for k, v in values.items() if k in setting_names})
    return settings, {k: v for k, v in values.items() if k in method_names}


def _run(fn, *args, **kwargs):
    try:
        with warnings.catch_warnings():  # restores the default display afterwards
            shown = warnings.showwarning
            warnings.showwarning = lambda message, category, *rest, **kw: (
                click.echo(f"warning: {message}", err=True) if issubclass(category, DiffpruneWarning)
                else shown(message, category, *rest, **kw))
            return fn(*args, **kwargs)
    except DiffpruneError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="diffprune")
def main() -> None:
    """diffprune: learn each task as a tiny sparse patch on one shared, frozen base model."""


def _train(config: str | None, **flags: Any) -> None:
    from diffprune.api import train

    values = _load_config(config)
    values.update({k: v for k, v in flags.items() if v is not None})
    settings, options = split_settings(values)
    record = train(settings, options)
    from accelerate import PartialState

    if not PartialState().is_main_process:  # one summary per run, not one per process
        return
    click.echo(f"dev {record['metric']}: {record['score']:.4f}, against {record['majority_class']['score']:.4f} for "
               f"always answering the majority class  ({record['task']}, {record['method']}, "
               f"{record['trainable_params']:,} trainable parameters, {record['seconds']:.0f} s)")
    for line in record.get("summary", []):
        click.echo(line)
    click.echo(f"run written to {settings.output}")


train_command = click.Command(
    "train",
    callback=lambda **kw: _run(_train, **kw),
    help="Train one GLUE task with one method; writes the run record, logs and artifact to --output.",
    params=[click.Option(["--config"], type=click.Path(dir_okay=False),
                         help="JSON or TOML file of settings (keys as the option names); flags win.")]
    + [_click_option(f) for f in fields(TrainSettings)]
    + [_method_option(f) for f in _method_fields().values()],
)
main.add_command(train_command)


@main.command("methods")
def methods_command() -> None:
    """List the registered methods, their default learning rate (--lr) and their options."""
    for name, cls in sorted(METHODS.items()):
        opts = ", ".join("--" + f.name.replace("_", "-") for f in fields(cls.Config)) or "no options"
        click.echo(f"{name:14s} {cls.summary}  (default --lr {cls.default_lr:g})  [{opts}]")


def _eval_options(fn):
    fn = click.option("--run", "run_dir", type=click.Path(file_okay=False), help="A finished run folder.")(fn)
    fn = click.option("--data-dir", help="GLUE folder; default: the one the run read (--run), else $GLUE_DIR, "
                      "else the HF hub.")(fn)
    fn = click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True, help="Evaluation batch size.")(fn)
    return fn


@main.command("eval")
@_eval_options
@click.option("--patch", "patch_file", type=click.Path(dir_okay=False), help="Score a patch file instead of a run.")
@click.option("--task", default=None, help="Task to score the patch on (default: the patch's own task).")
@click.option("--model", default=None, help="Base model for --patch (default: the one the patch names).")
@click.option("--split", default=None, help="Dev split to score (default: every dev split of the task).")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@click.option("--sparse", is_flag=True, help="Run the pruned Linear layers with the sparse CPU kernel "
              "(those where it is measured faster); the scores equal the dense model's.")
def eval_command(run_dir, data_dir, batch_size, patch_file, task, model, split, as_json, sparse) -> None:
    """Score a trained run (--run) or a patch (--patch) on the task's dev set(s)."""
    from diffprune.api import evaluate_patch, evaluate_run

    if bool(run_dir) == bool(patch_file):
        _run(_fail, "eval needs exactly one of --run DIR or --patch FILE")
    if patch_file:
        metrics = _run(evaluate_patch, patch_file, task, data_dir=data_dir, batch_size=batch_size, model=model,
                       split=split, sparse=sparse)
    else:
        metrics = _run(evaluate_run, run_dir, data_dir=data_dir, batch_size=batch_size, split=split, sparse=sparse)
    click.echo(json.dumps(metrics, indent=2) if as_json else "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


def _fail(message: str) -> None:
    raise DiffpruneError(message)


@main.command("predict")
@_eval_options
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Folder for the submission files.")
@click.option("--overwrite", is_flag=True, help="Replace submission files already in --output.")
def predict_command(run_dir, data_dir, batch_size, output, overwrite) -> None:
    """Write the task's test predictions in the GLUE server's submission format."""
    from diffprune.api import predict_run

    for path in _run(predict_run, run_dir, output, data_dir=data_dir, batch_size=batch_size, overwrite=overwrite):
        click.echo(f"wrote {path}")


from diffprune.patch.cli import patch_group  # noqa: E402  (the `patch` subcommands)
from diffprune.sparse.cli import speed_command  # noqa: E402

main.add_command(patch_group)

from diffprune.serving.cli import serve_command  # noqa: E402  (`serve`; its body lives in diffprune.serving)

main.add_command(serve_command)
main.add_command(speed_command)

if __name__ == "__main__":
    main()
