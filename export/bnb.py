"""The torch backend's quantization: bitsandbytes int8 / nf4 decoder linears, and fp16 / bf16 models.

For users who stay in PyTorch (DESIGN.md decision 5). Scope, as in Hugging Face's bitsandbytes
integration: the decoder's transformer-layer linears are replaced; the lm_head stays in `dtype` (its
error lands directly on the logits, `llm_int8_skip_modules` default) and so does the vision encoder
(its GEMMs run over thousands of tokens, where bitsandbytes' weight-only kernels buy no time). `dtype`
applies to the decoder on the CPU (see `quantize_torch_model`) and to the whole model on CUDA.

    int8  bnb.nn.Linear8bitLt (LLM.int8(): int8 weights per row, outlier columns above 6.0 kept in 16-bit)
    nf4   bnb.nn.Linear4bit, quant_type "nf4" (4-bit NormalFloat, block 64), computing in `dtype`

bitsandbytes >= 0.45 runs both on CPU (checked with 0.50.2 in tests/export/test_quantize.py).
"""

from __future__ import annotations

import os
from typing import Any

from edgevlm.errors import EdgeVLMError

TORCH_QUANTS = ("int8", "nf4")
TORCH_DTYPES = ("fp32", "fp16", "bf16")
_BNB_CPU_PACK_ROWS = 32  # row block of bitsandbytes' packed AVX512-BF16 nf4 CPU layout


def torch_dtype(name: str) -> Any:
    import torch

    if name not in TORCH_DTYPES:
        raise EdgeVLMError(f"--dtype must be one of {', '.join(TORCH_DTYPES)}, got {name!r}")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def import_bitsandbytes() -> Any:
    """bitsandbytes, imported with the Hugging Face Hub switched off for this process.

    On CPUs with AVX512-BF16, bitsandbytes (0.50) fetches a CPU kernel from the Hub at import time
    whenever the `kernels` package is installed; edgevlm never touches the network at run time.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    import bitsandbytes

    return bitsandbytes


def _bnb_linear(linear: Any, quant: str, dtype: Any, device: str) -> Any:
    bnb = import_bitsandbytes()

    bias = linear.bias is not None
    if quant == "int8":
        new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                  threshold=6.0)
    else:
        new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=dtype,
                                quant_type="nf4")
        packable = linear.out_features % _BNB_CPU_PACK_ROWS == 0 and linear.in_features % new.weight.blocksize == 0
        if not packable and hasattr(new, "support_avx512bf16_for_cpu"):
            # bitsandbytes 0.50 repacks nf4 weights for its AVX512-BF16 CPU kernel on the first forward and
            # fails there unless out_features % 32 == 0 and in_features is whole blocks (measured: a 48 x 128
            # layer raises); such layers take its generic CPU path, still nf4.
            new.support_avx512bf16_for_cpu = False
    new.load_state_dict(linear.state_dict())
    return new.to(device)  # bitsandbytes quantizes the weight when it is moved to its device


def quantize_torch_model(model: Any, quant: str | None, dtype: str = "fp32", device: str = "cpu") -> Any:
    """`model` (a MedVLM) cast to `dtype`, its decoder-layer linears replaced per `quant`; in place."""
    import torch

    # On the CPU the vision encoder and projector stay fp32: torch has no fp16/bf16 avg_pool3d kernel there
    # (the spp projector), and the decoder is where 16-bit weights pay (memory-bound decode).
    model = model.to(device=device)
    parts = [model.decoder] if device == "cpu" else [model]
    for part in parts:
        part.to(dtype=torch_dtype(dtype))
    if quant is None:
        return model
    if quant not in TORCH_QUANTS:
        raise EdgeVLMError(f"--quant must be one of {', '.join(TORCH_QUANTS)}, got {quant!r}")
    try:
        import_bitsandbytes()
    except ImportError:
        raise EdgeVLMError("--quant needs bitsandbytes: pip install 'edgevlm[bnb]'") from None
    for layer in model.decoder.layers:
        for parent in layer.modules():
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, _bnb_linear(child, quant, torch_dtype(dtype), device))
    return model
