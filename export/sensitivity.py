"""`--precision auto`: which decoder groups stay int8 so that an int4 bundle meets the int4 gate.

Groups: per transformer layer, its attention linears (q, k, v, o / fused qkv) and its MLP linears
(gate, up, down / fused gate_up); plus the lm_head, measured but held at the scheme's lm_head precision.
1. Sensitivity: quantize ONE group to int4 (everything else fp32, vision fp32) and measure the mean
   teacher-forced next-token KL(fp32 || that) on held-out volumes.
2. Mix: start from every group int4; promote groups to int8 in order of decreasing sensitivity, one at a
   time, and stop at the first mix that passes the whole gate (parity + task): the smallest bundle this
   greedy order reaches. If none passes, the last (all-int8) mix is returned with its failures.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from edgevlm.export.gates import measure_parity
from edgevlm.export.quantize import QuantConfig, layer_group, quantize_decoder


def choose_mix(base: dict[str, str], modules: dict[str, str], gate: Callable[[dict[str, str]], Any], ref_dir: Path,
               cfg: Any, qcfg: QuantConfig, ref: Any, table_ref: np.ndarray, volumes: np.ndarray,
               prompts: list[list[int]], image_id: int, steps: int, on_step: Callable[[str], None],
               feeds: list[dict[str, np.ndarray]] | None = None,
               ) -> tuple[dict[str, str], dict[str, Any], dict[str, int], dict[str, Any]]:
    """(plan, gate verdict, node counts, record for the manifest). `feeds`: the decoder's calibration
    inputs when int4 is data-aware (GPTQ), so each group is measured as it will be quantized."""
    from edgevlm.export.quantized_bundle import _ort, group_plan

    from edgevlm.runtime.bundle import DECODER_FILE, VISION_FILE

    groups = sorted({layer_group(m) for m in modules.values()} - {"lm_head"})
    fp32 = {n: "fp32" for n in base}
    sensitivity: dict[str, float] = {}
    tmp = Path(tempfile.mkdtemp(prefix="edgevlm-sensitivity-"))
    try:
        for group, bits in [(g, "int4") for g in groups] + [("lm_head", "int4"), ("lm_head", "int8")]:
            quantize_decoder(ref_dir / DECODER_FILE, tmp / DECODER_FILE, group_plan(fp32, modules, {group: bits}), qcfg,
                             feeds)
            one = _ort(tmp, cfg, "fp32", vision=ref_dir / VISION_FILE)
            kl = measure_parity(one, ref, table_ref, table_ref, volumes, prompts, image_id, steps)["logit_kl_mean"]
            sensitivity[group if group != "lm_head" else f"lm_head@{bits}"] = kl
            on_step(f"  sensitivity {group} @ {bits}: KL {kl:.5f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    order = sorted(groups, key=lambda g: -sensitivity[g])
    tried = []
    for k in range(len(order) + 1):
        plan = group_plan(base, modules, {g: "int8" for g in order[:k]})
        verdict, counts = gate(plan)
        tried.append({"int8_groups": order[:k], "passed": verdict["passed"], "failures": verdict["failures"]})
        on_step(f"  auto mix with {k} int8 group(s): {'passes' if verdict['passed'] else 'fails'}")
        if verdict["passed"]:
            break
    record = {"method": "one group int4 at a time -> mean teacher-forced logit KL; promote the most sensitive "
                        "groups to int8 until the gate passes",
              "sensitivity_kl": sensitivity, "order": order, "int8_groups": order[:k], "tried": tried}
    return plan, verdict, counts, record
