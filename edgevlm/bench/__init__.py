"""edgevlm.bench: benchmark reports for procurement review (`edgevlm bench`).

    from edgevlm.bench import BenchOptions, run_bench
    doc = run_bench(BenchOptions(bundles=[Path("m-fp32"), Path("m-int4")], studies="synthetic:16",
                                 out=Path("bench"), reference=Path("m-fp32")))
    doc["configurations"][0]["single_stream"]["latency_ms"]["p90"]

Scenarios as MLPerf Inference (single stream p90 latency, offline throughput), accuracy against ground
truth and as a fraction of a reference bundle, cold start, memory, and the machine's fingerprint; written
as results.json (schema: edgevlm/bench/schema.json), report.md and a self-contained report.html.
"""

from edgevlm.bench.compare import compare_results
from edgevlm.bench.requirements import REQUIREMENTS, apply_checks, check, load_requirements, parse_requirements, verdict
from edgevlm.bench.results import SCHEMA_VERSION, load_results, new_document, schema, write_outputs
from edgevlm.bench.run import BenchOptions, run_bench
from edgevlm.bench.stats import PERCENTILE_METHOD, percentile, summarize

__all__ = [
    "PERCENTILE_METHOD",
    "REQUIREMENTS",
    "SCHEMA_VERSION",
    "BenchOptions",
    "apply_checks",
    "check",
    "compare_results",
    "load_requirements",
    "load_results",
    "new_document",
    "parse_requirements",
    "percentile",
    "run_bench",
    "schema",
    "summarize",
    "verdict",
    "write_outputs",
]
