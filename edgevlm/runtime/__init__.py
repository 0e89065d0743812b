"""edgevlm.runtime: run a verified bundle on the ort or torch backend.

    session = load_bundle("bundle/", backend="ort", threads=4)
    result = session.generate(volume, "Is there a pleural effusion?")
    result.text, result.token_ids, result.timings_ms
"""

from edgevlm.runtime.backends import OrtBackend, TorchBackend, choose_providers
from edgevlm.runtime.bundle import SCHEMA_VERSION, Bundle, verify_bundle
from edgevlm.runtime.profile import PeakMemory, stage_rows, stage_table
from edgevlm.runtime.session import BACKENDS, Result, Session, generate_ids, load_bundle, splice_embeddings

__all__ = [
    "BACKENDS",
    "SCHEMA_VERSION",
    "Bundle",
    "OrtBackend",
    "PeakMemory",
    "Result",
    "Session",
    "TorchBackend",
    "choose_providers",
    "generate_ids",
    "load_bundle",
    "splice_embeddings",
    "stage_rows",
    "stage_table",
    "verify_bundle",
]
