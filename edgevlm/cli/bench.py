"""`edgevlm bench`: benchmark reports for procurement review; `edgevlm bench compare`: several in one.

A thin layer over `edgevlm.bench.run_bench` / `compare_results`: options in, progress on stderr, a
summary table and the output paths on stdout.
"""

from __future__ import annotations

from pathlib import Path

import typer

from edgevlm.cli import app, command, console, err_console, fail
from edgevlm.errors import EdgeVLMError

bench_app = typer.Typer(help="Benchmark bundles for procurement review (MLPerf-style scenarios, accuracy, memory).",
                        pretty_exceptions_enable=False, rich_markup_mode="rich")
app.add_typer(bench_app, name="bench")


def _batch_sizes(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise EdgeVLMError(f"--batch-sizes {text!r}: expected comma-separated integers like 1,2,4,8") from None


def _summary_table(doc: dict) -> None:
    from rich.table import Table

    from edgevlm.bench.report import COLUMNS, VERDICT_TEXT, headline

    # The terminal gets the key columns; report.md / report.html have them all.
    shown = [col for col in COLUMNS if col[0] in ("p90 s / study", "studies / hour (offline)", "peak RAM GB",
                                                   "peak VRAM GB", "finding F1", "F1 vs reference")]
    table = Table(show_edge=False)
    table.add_column("configuration")
    table.add_column("verdict")
    for header, _, _ in shown:
        table.add_column(header, justify="right")
    for c in doc["configurations"]:
        table.add_row(c["label"], VERDICT_TEXT.get(c.get("verdict") or "not checked", "?"),
                      *[get(c) for _, _, get in shown])
    console.print(table)
    for line in headline(doc):
        console.print(line, markup=False)


@bench_app.callback(invoke_without_command=True)
def bench(
    ctx: typer.Context,
    bundle: list[Path] = typer.Option(None, "--bundle", help="Bundle folder; repeat for several (fp32, int8, int4)."),
    studies: str = typer.Option("synthetic:16", "--studies", help="A folder of studies or synthetic:N."),
    out: Path = typer.Option(None, "-o", "--out", help="Output folder: results.json, report.md, report.html."),
    requirements: Path | None = typer.Option(None, "--requirements", help="Requirements TOML for pass/fail."),
    backend: list[str] = typer.Option(["ort"], "--backend", help="ort | torch; repeat for both."),
    repeats: int = typer.Option(3, "--repeats", help="Timed passes over the study set (single stream, offline)."),
    warmup: int = typer.Option(1, "--warmup", help="Untimed runs before single-stream timing."),
    reference: Path | None = typer.Option(None, "--reference", help="Reference bundle (fp32) for agreement and "
                                          "accuracy as a fraction of it."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads for onnxruntime / torch."),
    batch_sizes: str = typer.Option("1,2,4,8", "--batch-sizes", help="Offline batch sizes to try."),
    cold_starts: int = typer.Option(1, "--cold-starts", help="Fresh-process starts to time per configuration."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help="Token cap (default: the model's)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the single-stream study order."),
    label: str | None = typer.Option(None, "--label", help="Name of this machine in reports, e.g. 'Workstation A'."),
    synthetic_matrix: int = typer.Option(512, "--synthetic-matrix", help="Matrix of synthetic:N series (below 512: "
                                         "a quick smoke-test set)."),
) -> None:
    """Measure bundles the way MLPerf Inference does and write a report a procurement reviewer can read.

    Example: edgevlm bench --bundle m-fp32/ --bundle m-int4/ --reference m-fp32/ --studies synthetic:16 -o bench/
    --requirements req.toml
    """
    if ctx.invoked_subcommand is not None:
        return
    if not bundle:
        console.print(ctx.get_help())
        raise typer.Exit(0 if out is None else 2)
    if out is None:
        fail("give an output folder with -o OUTDIR")
    try:
        _run(bundle, studies, out, requirements, backend, repeats, warmup, reference, threads, batch_sizes,
             cold_starts, max_new_tokens, seed, label, synthetic_matrix)
    except EdgeVLMError as e:
        fail(str(e).replace("\n", " "), e.exit_code)


def _run(bundle: list[Path], studies: str, out: Path, requirements: Path | None, backend: list[str], repeats: int,
         warmup: int, reference: Path | None, threads: int | None, batch_sizes: str, cold_starts: int,
         max_new_tokens: int | None, seed: int, label: str | None, synthetic_matrix: int) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from edgevlm.bench import BenchOptions, run_bench

    opts = BenchOptions(bundles=list(bundle), studies=studies, out=out, backends=list(backend), repeats=repeats,
                        warmup=warmup, seed=seed, batch_sizes=_batch_sizes(batch_sizes), threads=threads,
                        max_new_tokens=max_new_tokens, cold_starts=cold_starts, reference=reference,
                        requirements=requirements, label=label, synthetic_matrix=synthetic_matrix)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=False) as progress:
        tasks: dict[str, int] = {}

        def on_event(config_id: str, event: dict) -> None:
            name = config_id.split("/", 1)[-1]
            if config_id not in tasks:
                tasks[config_id] = progress.add_task(name, total=None)
            if event["event"] == "progress":
                progress.update(tasks[config_id], description=f"{name}: {event['phase']}", completed=event["done"],
                                total=event["total"])
            elif event["event"] == "done":
                state = "done" if event["complete"] else f"[red]failed[/]: {event['error']}"
                progress.update(tasks[config_id], description=f"{name}: {state}", completed=1, total=1)

        try:
            doc = run_bench(opts, on_event, on_status=lambda msg: err_console.print(f"[dim]{msg}[/]"))
        except KeyboardInterrupt:
            progress.stop()
            err_console.print(f"[yellow]interrupted[/]: what finished is in {out / 'results.json'} (status "
                              "interrupted), with report.md and report.html")
            raise typer.Exit(130) from None
    _summary_table(doc)
    console.print(f"wrote {out / 'results.json'}, {out / 'report.md'}, {out / 'report.html'}")


@command(bench_app, name="compare")
def compare(
    results: list[Path] = typer.Argument(..., help="results.json files (or folders holding one) to put side by side."),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder: results.json, report.md, report.html."),
    requirements: Path | None = typer.Option(None, "--requirements", help="Judge every row by this TOML (default: "
                                             "the first run's requirements)."),
) -> None:
    """One report across machines and bundles: workstation A beside workstation B.

    Example: edgevlm bench compare wsA/results.json wsB/results.json -o compare/
    """
    from edgevlm.bench import compare_results, load_requirements, load_results, write_outputs

    docs = [load_results(p) for p in results]
    doc = compare_results(docs, load_requirements(requirements) if requirements else None)
    write_outputs(doc, out)
    _summary_table(doc)
    console.print(f"wrote {out / 'results.json'}, {out / 'report.md'}, {out / 'report.html'}")
