"""`edgevlm export MODEL -o BUNDLE`: a checkpoint -> a verified ONNX bundle with parity measured."""

from __future__ import annotations

from pathlib import Path

import typer

from edgevlm.cli import command, console, err_console


@command(name="export")
def export(
    model: str = typer.Argument(..., help="Checkpoint (.safetensors/.ckpt/.pt/.bin) or HF-style folder."),
    out: Path = typer.Option(..., "-o", "--out", help="Bundle folder to write (written atomically)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | fp16 (fp16 parity gate is looser)."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda: where graphs are traced and checked."),
    config: Path | None = typer.Option(None, "--config", help="Model config JSON when the checkpoint has none."),
    opset: int = typer.Option(18, "--opset", help="ONNX opset (17..23)."),
    tokenizer: Path | None = typer.Option(None, "--tokenizer", help="tokenizer.json when the checkpoint has none."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing bundle (only once complete)."),
    parity_tokens: int = typer.Option(8, "--parity-tokens", help="Greedy tokens compared per parity prompt."),
) -> None:
    """Export a checkpoint to an ONNX bundle and check it against PyTorch fp32.

    Example: edgevlm export model.safetensors -o bundle/ --precision fp32
    """
    from edgevlm.errors import EdgeVLMError
    from edgevlm.export import ParityConfig, export_bundle
    from edgevlm.runtime import verify_bundle

    tokenizer_json = None
    if tokenizer is not None:
        if not tokenizer.is_file():
            raise EdgeVLMError("tokenizer file not found", tokenizer)
        tokenizer_json = tokenizer.read_text()
    path = export_bundle(model, out, precision=precision, device=device, config=config, opset=opset,
                         tokenizer_json=tokenizer_json, overwrite=overwrite,
                         parity=ParityConfig(max_new_tokens=parity_tokens),
                         on_step=lambda msg: err_console.print(f"[dim]{msg}[/]"))  # progress: stderr
    bundle = verify_bundle(path, check_hashes=False)
    p = bundle.manifest["parity"]
    console.print(f"[bold green]bundle[/] {path}  id {bundle.bundle_id[:16]}  ({bundle.manifest['precision']}, "
                  f"opset {opset}, {sum(f['bytes'] for f in bundle.manifest['files'].values()) / 2**20:,.1f} MiB)")
    console.print(f"  parity vs PyTorch fp32: vision cosine min {p['vision_cosine_min']:.6f}, logits max abs diff "
                  f"{p['logits_max_abs_diff']:.2e}, greedy tokens equal in "
                  f"{sum(r['tokens_equal'] for r in p['generation'])}/{len(p['generation'])} runs  ({p['inputs']})")
