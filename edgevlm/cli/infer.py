"""`edgevlm infer STUDY --bundle BUNDLE`: generate text for one study, offline, with optional profiling."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from edgevlm.cli import command, console, err_console


@command(name="infer")
def infer(
    study: Path = typer.Argument(..., help="A DICOM file, a DICOM folder, or a NIfTI file."),
    bundle: Path = typer.Option(..., "--bundle", help="Bundle folder made by `edgevlm export`."),
    prompt: str | None = typer.Option(None, "--prompt", help="Question; default: the model's report prompt."),
    backend: str = typer.Option("ort", "--backend", help="ort (the bundle's ONNX graphs) | torch (its checkpoint)."),
    json_out: Path | None = typer.Option(None, "--json", help="Write text, timings and geometry (no PHI) here."),
    profile: bool = typer.Option(False, "--profile", help="Print a per-stage time and memory table."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads for onnxruntime / torch."),
    series: str | None = typer.Option(None, "--series", help="Series id when the folder holds several."),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help="Source checkpoint for --backend torch "
                                           "(default: the path recorded in the bundle)."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help="Cap on generated tokens."),
    quant: str | None = typer.Option(None, "--quant", help="--backend torch: int8 | nf4 decoder linears "
                                     "(bitsandbytes)."),
    dtype: str = typer.Option("fp32", "--dtype", help="--backend torch: fp32 | fp16 | bf16."),
) -> None:
    """Generate a report or an answer for a study.

    Example: edgevlm infer study/ --bundle bundle/ --prompt "Is there a pleural effusion?" --profile
    """
    from edgevlm.checkpoint import atomic_write
    from edgevlm.io import load_study
    from edgevlm.runtime import PeakMemory, load_bundle, stage_table

    with PeakMemory() as memory:
        session = load_bundle(bundle, backend=backend, threads=threads, checkpoint=checkpoint, quant=quant,
                              dtype=dtype)
        if "TensorrtExecutionProvider" in session.providers:
            from edgevlm.export.tensorrt import tensorrt_warning

            note = tensorrt_warning(session.bundle.manifest.get("tensorrt"))
            if note:
                err_console.print(f"[bold yellow]warning:[/] {note}")
        if session.bundle.manifest.get("degraded"):
            failures = session.bundle.manifest.get("accuracy", {}).get("failures", [])
            err_console.print(f"[bold yellow]warning:[/] this bundle missed its accuracy gate at export and was "
                              f"written with --allow-degradation ({'; '.join(failures)})")
        start = time.perf_counter()
        volume = load_study(study, series)
        read_ms = (time.perf_counter() - start) * 1000
        result = session.generate(volume, prompt, max_new_tokens=max_new_tokens)
    console.print(result.text, markup=False, highlight=False)
    if profile:
        console.print(stage_table(result, session.load_ms, read_ms, memory))
    if json_out is not None:
        record = {
            "text": result.text,
            "prompt": result.prompt,
            "token_ids": result.token_ids,
            "bundle_id": session.bundle.bundle_id,  # sha256 of manifest.json, which hashes every file
            "model": session.config.name,
            "precision": session.bundle.manifest.get("precision"),
            "backend": result.backend,
            "providers": result.providers,
            "study": volume.geometry(),  # geometry only: no path (folder names can hold names), no tags
            "timings_ms": {"load": session.load_ms, "read_study": read_ms, **result.timings_ms},
            "n_prompt_tokens": result.n_prompt_tokens,
            "n_new_tokens": result.n_new_tokens,
            "decode_ms_per_token": result.decode_ms_per_token,
            "decode_tokens_per_s": result.decode_tokens_per_s,
            "memory": memory.to_dict(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        text = json.dumps(record, indent=2)
        atomic_write(json_out, lambda p: p.write_text(text))
