"""`edgevlm export MODEL -o BUNDLE`: a checkpoint -> a verified ONNX bundle with parity measured."""

from __future__ import annotations

from pathlib import Path

import typer

from edgevlm.cli import command, console, err_console


@command(name="export")
def export(
    model: str = typer.Argument(..., help="Checkpoint (.safetensors/.ckpt/.pt/.bin) or HF-style folder."),
    out: Path = typer.Option(..., "-o", "--out", help="Bundle folder to write (written atomically)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | fp16 | int8 | int4 | auto (README: Precisions)."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda: where graphs are traced and checked."),
    config: Path | None = typer.Option(None, "--config", help="Model config JSON when the checkpoint has none."),
    from_: str | None = typer.Option(None, "--from", help="Read MODEL as a public checkpoint of this kind "
                                     "(m3d-lamed); by default it is auto-detected."),
    opset: int = typer.Option(18, "--opset", help="ONNX opset (17..23)."),
    tokenizer: Path | None = typer.Option(None, "--tokenizer", help="tokenizer.json when the checkpoint has none."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing bundle (only once complete)."),
    parity_tokens: int = typer.Option(8, "--parity-tokens", help="Greedy tokens compared per parity prompt."),
    calib: str = typer.Option("synthetic:32", "--calib", help="int8/int4/auto: calibration studies, a folder or "
                              "synthetic:N (seeds from 2,000,000)."),
    calib_method: str = typer.Option("minmax", "--calib-method", help="minmax | percentile | entropy."),
    int4_block_size: int = typer.Option(32, "--int4-block-size", help="Weights per int4 scale (power of 2)."),
    int4_method: str = typer.Option("rtn", "--int4-method",
                                     help="rtn | hqq (data-free) | gptq (data-aware, on the calibration studies)."),
    int8_decoder: str = typer.Option("nbits", "--int8-decoder", help="nbits (weight-only) | dynamic."),
    int8_attention: str = typer.Option("auto", "--int8-attention", help="int8 vision attention scores: "
                                       "dynamic (scales per call; onnxruntime CPU, plain attention graph) | "
                                       "float | auto (float where the attention is fused or on cuda, else "
                                       "dynamic)."),
    fused_attention: str = typer.Option("auto", "--fused-attention", help="vision attention as onnxruntime's "
                                        "fused MultiHeadAttention: on | off (standard ops, for TensorRT) | auto "
                                        "(on for --device cpu)."),
    symmetric_activations: bool = typer.Option(False, "--symmetric-activations",
                                               help="int8 vision activations with zero point 0 (TensorRT)."),
    gate_studies: str = typer.Option("synthetic:16", "--gate-studies", help="Held-out studies for the accuracy "
                                     "gate: a folder with ground truth or synthetic:N (seeds from 1,000,000)."),
    allow_degradation: bool = typer.Option(False, "--allow-degradation", help="Write a bundle that misses its "
                                           "accuracy gate, marked degraded in the manifest."),
) -> None:
    """Export a checkpoint to an ONNX bundle and check it against PyTorch fp32.

    Example: edgevlm export model.safetensors -o bundle/ --precision int4 --calib ./calib_studies
    """
    from edgevlm.errors import EdgeVLMError
    from edgevlm.export import ParityConfig, export_bundle
    from edgevlm.export.quantize import QuantConfig
    from edgevlm.runtime import verify_bundle

    tokenizer_json = None
    if tokenizer is not None:
        if not tokenizer.is_file():
            raise EdgeVLMError("tokenizer file not found", tokenizer)
        tokenizer_json = tokenizer.read_text()
    path = export_bundle(model, out, precision=precision, device=device, config=config, opset=opset, from_=from_,
                         tokenizer_json=tokenizer_json, overwrite=overwrite, fused_attention=fused_attention,
                         parity=ParityConfig(max_new_tokens=parity_tokens),
                         on_step=lambda msg: err_console.print(f"[dim]{msg}[/]"),  # progress: stderr
                         quant=QuantConfig(calib=calib, calib_method=calib_method, int4_block_size=int4_block_size,
                                           int4_method=int4_method, int8_decoder=int8_decoder,
                                           int8_attention=int8_attention,
                                           activation_symmetric=symmetric_activations, gate_studies=gate_studies,
                                           allow_degradation=allow_degradation))
    bundle = verify_bundle(path, check_hashes=False)
    p = bundle.manifest["parity"]
    console.print(f"[bold green]bundle[/] {path}  id {bundle.bundle_id[:16]}  ({bundle.manifest['precision']}, "
                  f"opset {opset}, {sum(f['bytes'] for f in bundle.manifest['files'].values()) / 2**20:,.1f} MiB)")
    console.print(f"  parity vs PyTorch fp32: vision cosine min {p['vision_cosine_min']:.6f}, logits max abs diff "
                  f"{p['logits_max_abs_diff']:.2e}, greedy tokens equal in "
                  f"{sum(r['tokens_equal'] for r in p['generation'])}/{len(p['generation'])} runs  ({p['inputs']})")
    acc = bundle.manifest.get("accuracy")
    if acc:
        par, task = acc["parity"], acc["task"]
        line = (f"  accuracy vs fp32 graphs: vision cosine min {par['vision_cosine_min']:.4f}, logit KL "
                f"{par['logit_kl_mean']:.4f}, top-1 agreement {par['top1_agreement']:.3f}")
        if task.get("applicable"):
            line += (f", finding F1 {task['quantized']['finding_f1']:.3f} ({task['f1_retention']:.1%} of fp32 "
                     f"{task['fp32']['finding_f1']:.3f})")
        console.print(line + f"  ({acc['gate_studies']})")
        for warning in acc.get("warnings", []):
            err_console.print(f"[bold yellow]warning:[/] accuracy gate: {warning}")
        if bundle.manifest.get("degraded"):
            err_console.print(f"[bold yellow]warning:[/] bundle is DEGRADED (written with --allow-degradation): "
                              f"{'; '.join(acc['failures'])}")
