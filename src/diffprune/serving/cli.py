"""`diffprune serve`: the HTTP server over a folder of patches (registered in diffprune.cli)."""

from __future__ import annotations

from pathlib import Path

import click

from diffprune.errors import DiffpruneError


def base_named_by(folder: Path) -> str | None:
    """The base the folder's first readable patch names (None: the packaged default)."""
    from diffprune.base import DEFAULT_MODEL_NAME
    from diffprune.serving.bank import RUN_PATCH, _read_meta

    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob(f"*/{RUN_PATCH}"))
    for f in files:
        try:
            name = _read_meta(f).get("base")
        except DiffpruneError:
            continue
        return None if name in (None, DEFAULT_MODEL_NAME) else name
    return None


def build_server(patches: str, model: str | None, api_key: str | None, memory_mb: int, max_inputs: int,
                 max_text_chars: int, max_wait_ms: float, max_batch_rows: int, mixed: bool, sparse: bool = False):
    from diffprune.base import load_base
    from diffprune.serving.app import Limits, create_app
    from diffprune.serving.bank import TaskBank

    folder = Path(patches)
    if not folder.is_dir():
        raise DiffpruneError(f"patch folder '{patches}' does not exist")
    base = load_base(model or base_named_by(folder), 2)
    bank = TaskBank(base, folder, memory_bytes=memory_mb * 2**20, sparse_runtime=sparse)
    for name, reason in sorted(bank.refused.items()):
        click.echo(f"warning: not serving {name}: {reason}", err=True)
    limits = Limits(max_inputs=max_inputs, max_text_chars=max_text_chars)
    app = create_app(bank, api_key=api_key or None, limits=limits, max_wait=max_wait_ms / 1000,
                     max_batch_rows=max_batch_rows, mixed=mixed)
    return app, bank


@click.command("serve")
@click.option("--patches", required=True, type=click.Path(file_okay=False),
              help="Folder of patches: NAME.safetensors files and run folders NAME/patch.safetensors.")
@click.option("--base", "model", default=None, help="Base model id or folder (default: the one the patches name).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (other hosts: say so here).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", envvar="DIFFPRUNE_API_KEY", default=None,
              help="Every request must carry it (X-API-Key or Authorization: Bearer) [env: DIFFPRUNE_API_KEY].")
@click.option("--memory-mb", default=512, show_default=True, type=click.IntRange(min=1),
              help="Memory for patches kept loaded; the least recently used leave beyond it.")
@click.option("--max-inputs", default=64, show_default=True, type=click.IntRange(min=1), help="Inputs per request.")
@click.option("--max-text-chars", default=4000, show_default=True, type=click.IntRange(min=1),
              help="Characters per text.")
@click.option("--max-wait-ms", default=5.0, show_default=True, type=click.FloatRange(min=0),
              help="How long a batch waits for more requests after its first.")
@click.option("--max-batch-rows", default=64, show_default=True, type=click.IntRange(min=1), help="Inputs per batch.")
@click.option("--mixed/--no-mixed", default=True, show_default=True,
              help="Run the rows of several tasks in one forward (else: one task at a time, by switching).")
@click.option("--sparse/--no-sparse", default=False, show_default=True,
              help="Run tasks whose patches prune Linear weights (mask, sparse model) on their own sparse models "
                   "(faster on the CPU; each holds its kept weights) instead of switching them onto the dense base.")
def serve_command(patches, model, host, port, api_key, memory_mb, max_inputs, max_text_chars, max_wait_ms,
                  max_batch_rows, mixed, sparse) -> None:
    """Serve every patch in a folder over HTTP, on one shared base (OpenAPI schema at /docs)."""
    from diffprune.cli import _run

    app, bank = _run(build_server, patches, model, api_key, memory_mb, max_inputs, max_text_chars, max_wait_ms,
                     max_batch_rows, mixed, sparse)
    import uvicorn

    click.echo(f"serving {len(bank.names())} tasks on {bank.base.name} at http://{host}:{port} "
               f"({'API key required' if api_key else 'no API key'})")
    uvicorn.run(app, host=host, port=port, log_level="warning")
