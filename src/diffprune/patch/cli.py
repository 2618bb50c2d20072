"""`diffprune patch ...`: inspect, apply, export, add and plot task patch files."""

from __future__ import annotations

import json

import click

from diffprune.errors import DiffpruneError


def _run(fn, *args, **kwargs):
    from diffprune.cli import _run as run

    return run(fn, *args, **kwargs)


@click.group("patch")
def patch_group() -> None:
    """Inspect, apply, export and plot task patch files."""


@patch_group.command("info")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
def info_command(file: str, as_json: bool) -> None:
    """What a patch holds: size, entries, base fingerprint, method, metrics."""
    from diffprune.patch import TaskPatch

    info = _run(lambda: TaskPatch.load(file).info())
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{file}: {info['method']} patch for {info['task']} on {info['base']}")
    click.echo(f"  base fingerprint {info['fingerprint']}")
    share = f"{100 * info['density']:.3f}%" if info["density"] is not None else "share unknown"
    click.echo(f"  {info['nnz']:,} changed entries of {info['base_params']:,} base parameters "
               f"({share}), {info['bytes']:,} bytes, values {info['value_dtype']}")
    click.echo(f"  {len(info['tensors'])} tensors changed; head: " + ", ".join(h["name"] for h in info["head"]))
    click.echo("  by kind: " + kind_counts(info))
    if info.get("metrics"):
        click.echo("  dev: " + ", ".join(f"{k} {v:.4f}" for k, v in info["metrics"].items()))


def kind_counts(info: dict) -> str:
    """'add: 1,234 entries changed in 12 tensors; mask: ...' for the kinds the patch holds."""
    from diffprune.patch.kinds import KIND_WORDS

    parts = []
    for kind, nnz in info["nnz_by_kind"].items():
        tensors = info["tensors_by_kind"][kind]
        if tensors:
            parts.append(f"{kind}: {nnz:,} entries {KIND_WORDS[kind]} in {tensors} tensor{'s' if tensors > 1 else ''}")
    return "; ".join(parts) or "none (the patch holds a head only)"


def _write_patched_model(file: str, output: str, model: str | None) -> None:
    from diffprune.patch.ops import export

    click.echo(f"wrote {_run(export, file, output, model)}")


@patch_group.command("apply")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--base", "model", default=None, help="Base model id or folder (default: the one the patch names).")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Folder for the patched model.")
def apply_command(file: str, model: str | None, output: str) -> None:
    """Apply a patch onto a base and write the patched model (refused if the base differs)."""
    _write_patched_model(file, output, model)


@patch_group.command("export")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Folder for the model.")
@click.option("--base", "model", default=None, help="Base model id or folder, should the one the patch names have "
              "moved (default: that one).")
def export_command(file: str, output: str, model: str | None) -> None:
    """Write base + patch as a plain transformers model folder (the base the patch names)."""
    _write_patched_model(file, output, model)


@patch_group.command("add")
@click.argument("first", type=click.Path(dir_okay=False))
@click.argument("second", type=click.Path(dir_okay=False))
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="Patch file to write.")
@click.option("--value-dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
              help="How the values are stored; auto keeps the inputs' dtype unless summed entries need float32.")
@click.option("--overwrite", is_flag=True, help="Replace --output if it exists.")
def add_command(first: str, second: str, output: str, value_dtype: str, overwrite: bool) -> None:
    """Sum two 'add' patches of the same base (a domain patch plus a task patch, say); the head
    and task are SECOND's. Reports the positions both change (their values are summed)."""
    from diffprune.patch.ops import add_files

    done = _run(add_files, first, second, output, value_dtype, overwrite)
    click.echo(f"wrote {done['output']}: {done['nnz']:,} changed entries ({done['first_nnz']:,} + "
               f"{done['second_nnz']:,}, {done['overlapping']:,} overlapping positions summed), "
               f"{done['bytes']:,} bytes, values {done['value_dtype']}")
    for name, count in sorted(done["overlaps"].items(), key=lambda kv: -kv[1])[:10]:
        click.echo(f"  {count:,} overlapping in {name}")


@patch_group.command("plot")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--output", required=True, type=click.Path(dir_okay=False),
              help="Image file to write: .png (added if the name has no suffix), .pdf, .svg, ...")
@click.option("--base", "model", default=None, help="Base model (default: the one the first patch names).")
def plot_command(files: tuple[str, ...], model: str | None, output: str) -> None:
    """Where each patch's changes live: density per layer and per type of tensor, side by side
    (switched-off and sparse entries marked)."""
    from diffprune.patch import TaskPatch
    from diffprune.patch.ops import base_for
    from diffprune.patch.plot import panel_labels, plot_path, plot_patches

    def plot() -> str:
        target = plot_path(output)  # before anything loads: a bad file name fails at once
        loaded = [TaskPatch.load(f) for f in files]
        patches = dict(zip(panel_labels(files, loaded), loaded))
        first = next(iter(patches.values()))
        base = base_for(first, model)
        for label, p in patches.items():
            if p.meta["fingerprint"] != base.fingerprint:
                raise DiffpruneError(f"{label} was made for base {p.meta['fingerprint']}, not {base.fingerprint}")
        shapes = {n: tuple(t.shape) for n, t in base.base_parameters().items()}
        return str(plot_patches(patches, shapes, target))

    click.echo(f"wrote {_run(plot)}")
