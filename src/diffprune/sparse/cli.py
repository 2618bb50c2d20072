"""`diffprune speed`: the latency of a model dense and sparse on this machine, and the speedup."""

from __future__ import annotations

import json

import click


@click.command("speed")
@click.argument("source", type=click.Path(exists=True))
@click.option("--base", "model", default=None, help="Base model for a patch (default: the one the patch names).")
@click.option("--batch-size", type=int, default=1, show_default=True, help="Sequences per call.")
@click.option("--length", type=int, default=128, show_default=True, help="Tokens per sequence.")
@click.option("--threads", type=int, default=None, help="Threads for both models [default: torch's, "
              "usually the number of cores].")
@click.option("--repeats", type=click.IntRange(min=3), default=30, show_default=True,
              help="Timed calls of each model (median; after 5 warm-up calls).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures and the per-layer choices as JSON.")
def speed_command(source, model, batch_size, length, threads, repeats, as_json) -> None:
    """Time SOURCE (a run folder, a patch file or a model folder) dense and sparse.

    Dense is the model as torch runs it (eager); sparse is the same model after `sparsify`,
    which runs each pruned Linear with the sparse kernel where that is measured faster, and
    BERT-style encoder layers as one fused call where that is. The two are called in turn, in
    blocks of calls, on the same random tokens, so other work on the machine slows both.
    """
    from diffprune.cli import _run
    from diffprune.sparse.speed import compare_speed, load_for_inference

    def measure():
        if threads is not None:  # refused before the model loads
            from diffprune.sparse.speed import check_threads

            check_threads(threads)
        return compare_speed(load_for_inference(source, model), batch_size, length, threads, repeats)

    result = _run(measure)
    if as_json:
        report = result.report.to_dict()
        click.echo(json.dumps({**result.to_dict(), **{k: report[k] for k in ("layers", "fused_layers", "model_ms")}},
                              indent=2))
        return
    w = result.weight_bytes
    click.echo(f"sparse: {result.report.summary()}")
    threads_text = f"{result.threads} thread{'s' if result.threads > 1 else ''}"
    click.echo(f"batch {batch_size} x {length} tokens, {threads_text}: dense {result.dense_ms:.2f} ms, "
               f"sparse {result.sparse_ms:.2f} ms, speedup {result.speedup:.2f}x "
               f"(largest output difference {result.max_abs_diff:.1e})")
    click.echo(f"Linear weights: {w['stored']:,} bytes as the sparse model holds them, against "
               f"{w['dense_fp32']:,} dense fp32 "
               f"({w['stored'] / max(1, w['dense_fp32']):.3f}x)")
