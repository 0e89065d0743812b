"""report.md and report.html from a results document (bench or compare).

Written for the procurement reviewer: the answer first (a summary table with pass/fail against the
requirements file), then the evidence (distributions, stage breakdown, accuracy against speed and
size, memory over the run), then how it was measured and on what. The HTML is one self-contained
file: inline CSS and inline SVG, no script, no font, image or style sheet fetched from anywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from html import escape
from typing import Any

from edgevlm.bench import svg
from edgevlm.bench.requirements import GB, REQUIREMENTS

MB = 2**20
STAGE_COLORS = {"read": "#9CA3AF", "preprocess": "#56B4E9", "vision": "#0072B2", "prefill": "#E69F00",
                "decode": "#009E73"}
VERDICT_TEXT = {"pass": "PASS", "fail": "FAIL", "incomplete": "INCOMPLETE", "not checked": "measured",
                "error": "ERROR"}


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d


def _num(v: float | None, digits: int = 2, scale: float = 1.0, pct: bool = False) -> str:
    if v is None:
        return "–"
    v = v / scale
    if pct:
        return f"{100 * v:.1f}%"
    return f"{v:,.{digits}f}"


def _secs(ms: float | None) -> str:
    if ms is None:
        return "–"
    s = ms / 1000
    return f"{s:.3f}" if s < 1 else f"{s:.2f}" if s < 100 else f"{s:,.0f}"


# (header, requirement key that colours the cell, value formatter)
Column = tuple[str, str | None, Callable[[dict], str]]
COLUMNS: list[Column] = [
    ("p50 s / study", "max_p50_seconds_per_study", lambda c: _secs(_get(c, "single_stream", "latency_ms", "p50"))),
    ("p90 s / study", "max_p90_seconds_per_study", lambda c: _secs(_get(c, "single_stream", "latency_ms", "p90"))),
    ("studies / hour (offline)", "min_studies_per_hour",
     lambda c: "–" if _get(c, "offline", "studies_per_hour") is None else
     f"{c['offline']['studies_per_hour']:,.0f} (batch {c['offline']['best_batch_size']})"),
    ("cold start s", "max_cold_start_seconds", lambda c: _secs(_get(c, "load", "cold_start", "summary", "p50"))),
    ("peak RAM GB", "max_host_ram_gb", lambda c: _num(_get(c, "memory", "peak_rss_bytes"), 2, GB)),
    ("peak VRAM GB", "max_vram_gb",
     lambda c: "CPU only" if _get(c, "backend", "device") == "cpu"
     else _num(_get(c, "memory", "peak_vram_bytes"), 2, GB)),
    ("bundle MB", "max_bundle_size_gb", lambda c: _num(_get(c, "bundle", "size_bytes"), 1, MB)),
    ("finding F1", "min_finding_f1", lambda c: _num(_get(c, "accuracy", "finding_micro_f1"), 3)),
    ("closed-question accuracy", "min_closed_accuracy", lambda c: _num(_get(c, "accuracy", "closed_accuracy"), 3)),
    ("F1 vs reference", "min_accuracy_fraction_of_reference",
     lambda c: _num(_get(c, "reference_agreement", "f1_fraction_of_reference"), pct=True)),
]


def _status(c: dict, requirement: str | None) -> str | None:
    for check in c.get("checks") or []:
        if check["requirement"] == requirement:
            return check["status"]
    return None


def _requirements(doc: dict) -> dict | None:
    return doc.get("requirements") or next((r["requirements"] for r in doc["runs"] if r.get("requirements")), None)


def headline(doc: dict) -> list[str]:
    """The answer in sentences: how many configurations pass, and the fastest one that does."""
    configs = [c for c in doc["configurations"] if c.get("single_stream")]
    reqs = _requirements(doc)
    out = []
    if doc.get("status") not in ("complete", None):
        out.append(f"This run is {doc['status']}: the tables cover what finished.")
    if not configs:
        return [*out, "No configuration finished a measurement."]

    def p90(c: dict) -> float:
        return c["single_stream"]["latency_ms"]["p90"] or float("inf")

    def describe(c: dict) -> str:
        parts = [f"p90 {_secs(p90(c))} s per study"]
        if _get(c, "offline", "studies_per_hour"):
            parts.append(f"{c['offline']['studies_per_hour']:,.0f} studies/hour batched")
        parts.append(f"{_num(_get(c, 'memory', 'peak_rss_bytes'), 2, GB)} GB RAM")
        if _get(c, "backend", "device") != "cpu" and _get(c, "memory", "peak_vram_bytes") is not None:
            parts.append(f"{_num(c['memory']['peak_vram_bytes'], 2, GB)} GB VRAM")
        if _get(c, "reference_agreement", "f1_fraction_of_reference") is not None:
            parts.append(f"finding F1 {_num(c['reference_agreement']['f1_fraction_of_reference'], pct=True)} "
                         "of the reference")
        elif _get(c, "accuracy", "finding_micro_f1") is not None:
            parts.append(f"finding F1 {c['accuracy']['finding_micro_f1']:.3f}")
        return ", ".join(parts)

    if reqs:
        name = f" of “{reqs['name']}”" if reqs.get("name") else ""
        passing = [c for c in configs if c.get("verdict") == "pass"]
        out.append(f"{len(passing)} of {len(doc['configurations'])} configurations meet all "
                   f"{len(reqs['limits'])} requirements{name}.")
        if passing:
            best = min(passing, key=p90)
            out.append(f"Fastest that passes: {best['label']}: {describe(best)}.")
        for c in configs:
            failed = [ch for ch in c.get("checks") or [] if ch["status"] != "pass"]
            if failed:
                why = "; ".join(f"{ch['what']} {_fmt_check_value(ch)} (limit {_fmt_limit(ch)})"
                                if ch["status"] == "fail" else f"{ch['what']} not measured" for ch in failed)
                out.append(f"{c['label']}: {VERDICT_TEXT.get(c.get('verdict'), '?')}: {why}.")
    else:
        best = min(configs, key=p90)
        out.append("No requirements file was given, so nothing is judged pass or fail. "
                   f"Fastest: {best['label']}: {describe(best)}.")
    return out


def _fmt_check_value(ch: dict) -> str:
    v = ch["value"]
    if v is None:
        return "–"
    if ch["requirement"] == "min_accuracy_fraction_of_reference":
        return f"{100 * v:.1f}%"
    return f"{v:,.3g} {ch['unit']}".strip()


def _fmt_limit(ch: dict) -> str:
    sign = "≤" if ch["kind"] == "max" else "≥"
    if ch["requirement"] == "min_accuracy_fraction_of_reference":
        return f"{sign} {100 * ch['limit']:.1f}%"
    return f"{sign} {ch['limit']:,.4g} {ch['unit']}".strip()


# ---------------------------------------------------------------- shared detail rows


def detail_rows(c: dict) -> list[tuple[str, str]]:
    """(what, value) rows with everything measured for one configuration."""
    ss, off, acc, agr = c.get("single_stream"), c.get("offline"), c.get("accuracy"), c.get("reference_agreement")
    b, be, mem, cold = c["bundle"], c["backend"], c.get("memory") or {}, _get(c, "load", "cold_start")
    rows = [
        ("bundle", f"{b['name']} ({b.get('model')}, {b.get('precision')}), id {b['bundle_id'][:16]}, "
                   f"{_num(b['size_bytes'], 1, MB)} MB in {b['n_files']} files"),
        ("backend", f"{be['name']} on {be.get('device') or '?'}; providers "
                    f"{', '.join(be.get('providers') or []) or '–'}; threads {_threads(be.get('threads'))}"),
        ("bundle load", f"{_num(_get(c, 'load', 'bundle_load_ms'), 0)} ms (verify sha256 of every file + create "
                        "sessions)"),
    ]
    if cold and cold.get("wall_ms"):
        bd = cold["breakdown_ms"]
        rows.append(("cold start", f"{_secs(cold['summary']['p50'])} s median of {cold['n']} (interpreter + imports "
                                   f"{_secs(bd['interpreter_and_imports'])} s, load {_secs(bd['load'])} s, read study "
                                   f"{_secs(bd['read_study'])} s, generate {_secs(bd['generate'])} s)"))
    elif cold and cold.get("error"):
        rows.append(("cold start", f"failed: {cold['error']}"))
    if ss:
        lat, ttft, per = ss["latency_ms"], ss["ttft_ms"], ss["decode_ms_per_token"]
        rows += [
            ("single stream", f"{ss['n_samples']} timed runs ({ss['repeats']} repeats × studies), "
                              f"{ss['warmup_runs']} warm-up run(s) excluded"),
            ("latency per study", f"p50 {_secs(lat['p50'])} s, p90 {_secs(lat['p90'])} s, p99 {_secs(lat['p99'])} s, "
                                  f"mean {_secs(lat['mean'])} ± {_secs(lat['std'])} s (min {_secs(lat['min'])}, "
                                  f"max {_secs(lat['max'])})"),
            ("p90 per repeat", ", ".join(f"{_secs(r['p90'])} s" for r in ss["per_repeat"]) or "–"),
            ("time to first token", f"p50 {_secs(ttft['p50'])} s, p90 {_secs(ttft['p90'])} s (read study to first "
                                    "token)"),
            ("decode", f"p50 {_num(per['p50'], 2)} ms per token ({_num(1000 / per['p50'] if per['p50'] else None, 1)} "
                       f"tokens/s); {_num(ss['n_new_tokens']['mean'], 1)} tokens per report on average"),
            ("stages (mean ms)", ", ".join(f"{k} {_num(v, 1)}" for k, v in ss["stages_ms_mean"].items())),
        ]
    if off:
        tried = "; ".join(f"batch {e['batch_size']}: {_num(e['studies_per_hour_median'], 0)} studies/h"
                          for e in off["tried"])
        rows.append(("offline", f"{tried} (best batch {off['best_batch_size']})"))
    rows.append(("peak memory", f"RAM {_num(mem.get('peak_rss_bytes'), 2, GB)} GB (RSS sampled every "
                                f"{_num(_get(mem, 'timeline', 'interval_s'), 2)} s); GPU "
                                + ("not used" if be.get("device") == "cpu" else
                                   f"{_num(mem.get('peak_vram_bytes'), 2, GB)} GB ({mem.get('vram_source')})")))
    if acc:
        f1 = (f"finding F1 {_num(acc['finding_micro_f1'], 3)} (P {_num(acc['finding_micro_precision'], 3)}, "
              f"R {_num(acc['finding_micro_recall'], 3)}, macro F1 {_num(acc['finding_macro_f1'], 3)})")
        qa = (f"closed questions {_num(acc['closed_accuracy'], 3)} (n={acc['n_closed']}), open "
              f"{_num(acc['open_accuracy'], 3)} (n={acc['n_open']})")
        rows.append(("accuracy", f"{f1}; {qa}; over {acc['n_studies']} studies"))
        rows.append(("lexical", f"BLEU-1 {_num(acc['bleu1'], 3)}, BLEU-4 {_num(acc['bleu4'], 3)}, ROUGE-L "
                                f"{_num(acc['rouge_l'], 3)}, METEOR (no synonyms) {_num(acc['meteor_nosyn'], 3)}"))
    if agr:
        meets = {True: "yes", False: "no", None: "–"}
        rows.append((f"vs reference {agr['reference']}",
                     f"finding F1 {_num(agr['f1_fraction_of_reference'], pct=True)} of reference (Δ "
                     f"{_num(agr['finding_f1_delta'], 3)}); meets 99%: {meets[agr['meets_99']]}, 99.9%: "
                     f"{meets[agr['meets_99_9']]}; token agreement {_num(agr['token_agreement'], pct=True)}, identical "
                     f"reports {_num(agr['report_exact_match_rate'], pct=True)}, identical outputs (reports + answers) "
                     f"{_num(agr['exact_match_rate'], pct=True)}"))
    if c.get("error"):
        rows.append(("error", c["error"]))
    return rows


def _threads(t: dict | None) -> str:
    if not t:
        return "–"
    return ", ".join(f"{k} {v}" for k, v in t.items() if k != "note")


def method_paragraphs(doc: dict) -> list[str]:
    run = doc["runs"][0]
    s, st = run["settings"], run["study_set"]
    synthetic = st["source"] == "synthetic"
    paras = [
        "Scenarios follow MLPerf Inference. <b>Single stream</b>: one study at a time, timed end to end from "
        "reading the study from disk (DICOM) to the finished text; every study of the set is run once per repeat, "
        f"in a seeded random order (seed {s['seed']}); {s['repeats']} repeat(s); {s['warmup_runs']} warm-up run(s) "
        "before timing are excluded and counted. Latency percentiles (p50, p90, p99) use "
        f"{escape(s['percentile_method'])}. Time to first token runs from reading the study to the first generated "
        "token. Generation is greedy and stops at the model's stop token or its token cap "
        f"({s['max_new_tokens'] or 'model default'}), so latency includes the real report length.",
        "<b>Offline</b>: the whole set is available at once; studies are read, preprocessed and generated in batches "
        f"of each size tried ({', '.join(map(str, s['batch_sizes']))}, capped at the set size), one warm-up batch "
        "per size excluded; throughput = studies / wall time, median over the repeats; the best batch size is "
        "reported. Concurrency across processes is not tried: one session uses all the threads it is given.",
        "<b>Cold start</b>: wall time of <code>edgevlm infer</code> in a new Python process (interpreter start, "
        "imports, bundle verification and load, reading one study, generation, exit) with the operating system's file "
        "cache warm; after a reboot the first start also reads the bundle from disk. <b>Bundle load</b>: verifying "
        "every file's sha256 and creating the inference sessions, inside a running process.",
        "<b>Memory</b>: each configuration runs in a fresh process, so its peak RAM is its own: resident set size "
        "sampled every 50 ms (and the kernel's lifetime maximum, kept in results.json). GPU memory, when a GPU is "
        "used: torch's peak allocation, or NVML's memory used by the process. GB = 2<sup>30</sup> bytes.",
        "<b>Accuracy</b>: for every study, the report and every ground-truth question, scored as "
        "<code>edgevlm eval</code> does: finding-level micro F1 with negation handling (the clinical metric), "
        "closed-question accuracy, open-question accuracy, and the lexical metrics the field reports (BLEU, "
        "ROUGE-L, METEOR). With a reference bundle (fp32), each configuration's finding F1 is stated as a fraction "
        "of the reference's, with the MLPerf targets 99% and 99.9%; token agreement and identical-output rates "
        "show how often the outputs are literally the same.",
        f"<b>Study set</b>: {escape(st['description'])}, {st['n_studies']} studies, content sha256 "
        f"<code>{st['content_sha256'][:16]}…</code> (equal sets hash equal under any names). "
        + ("These are procedurally generated synthetic chest CT phantoms with known findings. They show whether "
           "compression and this workstation preserve the model's behaviour; they are <b>not clinical "
           "validation</b>. Before clinical use, validate on local studies (ECLAIR: performance and validation)."
           if synthetic else "Accuracy holds for this study set only; it is as representative as the set is."),
    ]
    loads = [r["fingerprint"].get("load_average_start") for r in doc["runs"]]
    for r, load in zip(doc["runs"], loads, strict=True):
        cores = r["fingerprint"]["cpu"]["usable_cores"] or r["fingerprint"]["cpu"]["logical_cores"]
        if load and cores and load[0] > 0.5 * cores:
            paras.append(f"<b>Machine load</b> ({escape(r['label'])}): the 1-minute load average was {load[0]} on "
                         f"{cores} cores when the run started ({r['fingerprint'].get('load_average_end')} at the "
                         "end): other work shared the CPUs, so these timings are pessimistic for a dedicated "
                         "workstation.")
    return paras


def fingerprint_rows(run: dict) -> list[tuple[str, str]]:
    f = run["fingerprint"]
    cpu = f["cpu"]
    gpus = "; ".join(f"{g['name']} {_num(g['vram_bytes'], 1, GB)} GB, driver {g.get('driver') or '?'}, CUDA "
                     f"{g.get('cuda_driver') or '?'}" for g in f["gpus"]) or f"none ({f.get('gpu_note')})"
    libs = ", ".join(f"{k} {v}" for k, v in f["libraries"].items() if v)
    torch = f.get("torch") or {}
    env = ", ".join(f"{k}={v}" for k, v in f["thread_env"].items() if v) or "none set"
    return [
        ("machine", run["label"]),
        ("CPU", f"{cpu['model']} ({cpu['architecture']}), {cpu['physical_cores']} physical / {cpu['logical_cores']} "
                f"logical cores, {cpu['usable_cores']} usable by this process; int8/bf16 ISA: "
                f"{' '.join(cpu.get('isa') or []) or 'none detected'}"),
        ("RAM", f"{_num(f['memory']['total_bytes'], 1, GB)} GB"),
        ("GPU", gpus),
        ("OS", f"{f['os']['platform']} ({f['os'].get('libc') or ''})"),
        ("Python", f"{f['python']['implementation']} {f['python']['version']}"),
        ("edgevlm", f["edgevlm_version"]),
        ("libraries", libs),
        ("torch", f"CUDA {torch.get('cuda') or 'none'}, cuDNN {torch.get('cudnn') or 'none'}, "
                  f"{torch.get('num_threads')} intra-op threads" if torch else "not installed"),
        ("onnxruntime providers", ", ".join(f["onnxruntime_providers"])),
        ("thread settings", f"environment: {env}; --threads {run['settings'].get('threads') or 'library default'}"),
        ("load average", f"start {f.get('load_average_start')}, end {f.get('load_average_end')}"),
        ("command", run["command"]),
        ("study set", f"{run['study_set']['description']}; content sha256 {run['study_set']['content_sha256']}"),
        ("started / finished", f"{run['started_utc']} / {run.get('finished_utc') or '–'}"),
    ]


# ---------------------------------------------------------------- markdown


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    clean = [[str(x).replace("|", "\\|").replace("\n", " ") for x in row] for row in rows]
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in clean]


def render_markdown(doc: dict) -> str:
    configs = doc["configurations"]
    runs = doc["runs"]
    title = "edgevlm benchmark report" + (" (comparison)" if doc["kind"] == "compare" else "")
    lines = [f"# {title}", "", f"{', '.join(r['label'] for r in runs)}; {doc['created_utc']}; status "
             f"**{doc['status']}**; schema {doc['schema']} v{doc['schema_version']}", ""]
    lines += [f"**{s}**" if i == 0 else s for i, s in enumerate(headline(doc))]
    lines.append("")
    header = ["configuration", "verdict"] + [h for h, _, _ in COLUMNS]
    rows = []
    for c in configs:
        row = [c["label"], VERDICT_TEXT.get(c.get("verdict") or "not checked", "?")]
        for _, req, get in COLUMNS:
            mark = {"fail": " ✗", "pass": " ✓"}.get(_status(c, req) or "", "")
            row.append(get(c) + mark)
        rows.append(row)
    lines += _md_table(header, rows)
    lines += ["", "✓ / ✗: the value meets / misses that column's requirement. Charts: report.html.", ""]
    reqs = _requirements(doc)
    if reqs:
        lines += ["## Requirements", "", f"{reqs.get('name') or 'requirements file'}:", ""]
        for key, limit in reqs["limits"].items():
            what, unit, kind, _ = REQUIREMENTS[key]
            lines.append(f"- {what} {'≤' if kind == 'max' else '≥'} {limit:g} {unit} (`{key}`)")
        lines.append("")
    lines += ["## Details", ""]
    for c in configs:
        lines += [f"### {c['label']}", "", *_md_table(["", ""], [list(r) for r in detail_rows(c)]), ""]
    lines += ["## Method", ""] + [_strip_tags(p) for p in method_paragraphs(doc) for p in (p, "")]
    for note in doc.get("notes") or []:
        lines += [f"Note: {note}", ""]
    lines += ["## Environment", ""]
    for run in runs:
        lines += [f"### {run['label']}", "", *_md_table(["", ""], [list(r) for r in fingerprint_rows(run)]), ""]
    bundles = sorted({f"{c['bundle']['name']} {c['bundle']['bundle_id']}" for c in configs})
    lines += ["Bundles (manifest sha256): " + "; ".join(bundles), ""]
    return "\n".join(lines)


def _strip_tags(html: str) -> str:
    import re

    text = re.sub(r"</?(b|code|sup)>", lambda m: "**" if m.group(1) == "b" else "`" if m.group(1) == "code" else "^",
                  html)
    return text.replace("^2^30", "^30").replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


# ---------------------------------------------------------------- html

CSS = """
:root { --ink:#111827; --muted:#6b7280; --line:#e5e7eb; --pass:#047857; --passbg:#d1fae5; --fail:#b91c1c;
        --failbg:#fee2e2; --warn:#92400e; --warnbg:#fef3c7; }
* { box-sizing: border-box; }
body { margin: 0; background: #f3f4f6; color: var(--ink);
       font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; }
main { max-width: 1320px; margin: 0 auto; padding: 28px 32px 48px; }
header h1 { font-size: 26px; margin: 0 0 4px; }
header .sub { color: var(--muted); }
section { background: white; border: 1px solid var(--line); border-radius: 10px; padding: 20px 24px; margin: 18px 0; }
h2 { font-size: 18px; margin: 0 0 12px; }
h3 { font-size: 15px; margin: 18px 0 6px; }
.answer p { margin: 4px 0; font-size: 15px; }
.answer p.lead { font-size: 20px; font-weight: 650; margin-bottom: 8px; }
table { border-collapse: collapse; width: 100%; }
th, td { padding: 7px 9px; border-bottom: 1px solid var(--line); text-align: right; vertical-align: top; }
th { font-size: 12px; color: var(--muted); font-weight: 600; text-transform: none; background: #f9fafb; }
td:first-child, th:first-child { text-align: left; }
table.summary td { font-size: 15px; font-variant-numeric: tabular-nums; }
table.summary td:first-child { white-space: nowrap; }
td.pass { background: var(--passbg); color: var(--pass); font-weight: 600; }
td.fail { background: var(--failbg); color: var(--fail); font-weight: 700; }
td.unknown { background: var(--warnbg); color: var(--warn); }
.badge { display: inline-block; padding: 2px 10px; border-radius: 999px; font-weight: 700; font-size: 13px; }
.badge.pass { background: var(--pass); color: white; } .badge.fail { background: var(--fail); color: white; }
.badge.incomplete, .badge.error { background: #d97706; color: white; }
.badge.measured { background: #e5e7eb; color: var(--ink); }
table.kv td { text-align: left; } table.kv td:first-child { color: var(--muted); width: 210px; white-space: nowrap; }
.grid { display: grid; grid-template-columns: 1fr 1fr; gap: 18px; }
.note { color: var(--muted); font-size: 13px; }
.banner { background: var(--warnbg); color: var(--warn); border: 1px solid #fcd34d; padding: 10px 14px;
          border-radius: 8px; font-weight: 600; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px; }
svg { width: 100%; height: auto; display: block; }
"""


def _kv(rows: list[tuple[str, str]]) -> str:
    return "<table class='kv'>" + "".join(f"<tr><td>{escape(k)}</td><td>{escape(v)}</td></tr>" for k, v in rows) \
        + "</table>"


def _charts(doc: dict) -> list[tuple[str, str, str]]:
    """(title, note, svg) for each chart that has data."""
    configs = [c for c in doc["configurations"] if c.get("single_stream") and c["single_stream"]["samples"]]
    charts = []
    box = svg.box_plot([(c["label"], [s["latency_ms"] / 1000 for s in c["single_stream"]["samples"]]) for c in configs],
                       "seconds per study (single stream, read study → text)", "Latency per study")
    if box:
        charts.append(("Latency per study", "Box: middle half of the runs; thick line: median; whiskers: min to "
                       "max; dots: every timed run; red tick: p90, the MLPerf single-stream figure.", box))
    stages = svg.stacked_bars([(c["label"], c["single_stream"]["stages_ms_mean"]) for c in configs],
                              list(STAGE_COLORS), STAGE_COLORS, "mean milliseconds per study", "Where the time goes")
    if stages:
        charts.append(("Where the time goes", "Mean time per stage of one study. Bundle loading happens once per "
                       "process and is not in these bars (see cold start).", stages))
    with_acc = [c for c in configs if _get(c, "accuracy", "finding_micro_f1") is not None]
    if with_acc:
        pts = [{"label": c["label"], "color": svg.color(i), "y": c["accuracy"]["finding_micro_f1"],
                "x": c["single_stream"]["latency_ms"]["p90"] / 1000} for i, c in enumerate(configs) if c in with_acc]
        size = [{**p, "x": c["bundle"]["size_bytes"] / MB} for p, c in zip(pts, with_acc, strict=True)]
        a = svg.scatter(pts, "p90 seconds per study", "finding F1", "Accuracy vs latency", y_range=(0, 1))
        b = svg.scatter(size, "bundle size on disk (MB)", "finding F1", "Accuracy vs size", y_range=(0, 1))
        charts.append(("Accuracy vs latency and size", "Up and to the left is better: finding F1 on the study set "
                       "against the p90 latency and the bundle's size.", f"<div class='grid'>{a}{b}</div>"))
    off = [c for c in configs if _get(c, "offline", "tried")]
    if off:
        sizes = sorted({e["batch_size"] for c in off for e in c["offline"]["tried"]})
        series = [{"label": c["label"], "color": svg.color(configs.index(c)),
                   "xs": [e["batch_size"] for e in c["offline"]["tried"] if e["studies_per_hour_median"]],
                   "ys": [e["studies_per_hour_median"] for e in c["offline"]["tried"] if e["studies_per_hour_median"]]}
                  for c in off]
        ticks = sizes if len(sizes) > 1 else [0, sizes[0]]
        charts.append(("Offline throughput by batch size", "Studies per hour with all studies available at once "
                       "(median of repeats) at each batch size tried.",
                       svg.lines(series, "batch size", "studies per hour", "Offline throughput", markers=True,
                                 x_ticks=ticks, height=280)))
    mem = [c for c in configs if _get(c, "memory", "timeline", "t_s")]
    if mem:
        series = [{"label": c["label"], "color": svg.color(configs.index(c)), "xs": c["memory"]["timeline"]["t_s"],
                   "ys": [b / GB for b in c["memory"]["timeline"]["rss_bytes"]]} for c in mem]
        gpu = [{"label": c["label"], "color": svg.color(configs.index(c)), "xs": c["memory"]["timeline"]["t_s"],
                "ys": [b / GB for b in c["memory"]["timeline"]["gpu_bytes"]]}
               for c in mem if c["memory"]["timeline"].get("gpu_bytes")]
        phases = "; ".join(f"{escape(c['label'])}: " + ", ".join(f"{p['name']} at {p['t_s']:.0f} s"
                                                                  for p in c["memory"]["timeline"]["phases"])
                           for c in mem)
        chart = svg.lines(series, "seconds since the configuration's process started measuring", "host RAM (GB)",
                          "Host memory over the run")
        if gpu:
            chart += svg.lines(gpu, "seconds", "GPU memory (GB)", "GPU memory over the run")
        charts.append(("Memory over the run", f"Resident memory of each configuration's process. Phases: {phases}.",
                       chart))
    return charts


def render_html(doc: dict) -> str:
    configs = doc["configurations"]
    runs = doc["runs"]
    reqs = _requirements(doc)
    title = "edgevlm benchmark report" + (": comparison" if doc["kind"] == "compare" else "")
    head = headline(doc)
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{escape(title)}</title>"
             f"<style>{CSS}</style></head><body><main>",
             f"<header><h1>{escape(title)}</h1><div class='sub'>{escape(' · '.join(r['label'] for r in runs))} · "
             f"{escape(doc['created_utc'])} · edgevlm {escape(doc['edgevlm_version'])} · results schema "
             f"v{doc['schema_version']}</div></header>"]
    if doc.get("status") != "complete":
        parts.append(f"<p class='banner'>Status: {escape(doc['status'])}. Only what finished is shown.</p>")
    # The answer: headline sentences and the summary table.
    sentences = [h for h in head if not h.startswith("This run is")]
    parts.append("<section class='answer'><h2>Summary</h2>"
                 + "".join(f"<p class='{'lead' if i == 0 else ''}'>{escape(s)}</p>" for i, s in enumerate(sentences)))
    th = "".join(f"<th>{escape(h)}</th>" for h, _, _ in COLUMNS)
    body = []
    for c in configs:
        v = c.get("verdict") or "not checked"
        cls = v.replace(" ", "-") if v != "not checked" else "measured"
        cells = []
        for _, req, get in COLUMNS:
            st = _status(c, req)
            cells.append(f"<td class='{st or ''}'>{escape(get(c))}</td>")
        body.append(f"<tr><td><b>{escape(c['label'])}</b><br><span class='note'>{escape(str(c['bundle'].get('model')))}"
                    f", {escape(str(c['bundle'].get('precision')))}</span></td><td><span class='badge {cls}'>"
                    f"{VERDICT_TEXT.get(v, v)}</span></td>{''.join(cells)}</tr>")
    parts.append(f"<table class='summary'><tr><th>configuration</th><th>verdict</th>{th}</tr>{''.join(body)}</table>")
    legend = ("Green / red cells meet / miss that column's requirement; amber: not measured. "
              if reqs else "No requirements file: values are measured, not judged. ")
    st = runs[0]["study_set"]
    parts.append(f"<p class='note'>{legend}Latency: one study at a time, reading the study from disk to the "
                 f"finished report. Accuracy on {escape(st['description'])}"
                 + (" — synthetic phantoms, not clinical validation." if st["source"] == "synthetic" else ".")
                 + "</p></section>")
    if reqs:
        items = "".join(f"<tr><td>{escape(REQUIREMENTS[k][0])}</td><td>{'≤' if REQUIREMENTS[k][2] == 'max' else '≥'} "
                        f"{escape(f'{v:g}')} {escape(REQUIREMENTS[k][1])}</td><td><code>{escape(k)}</code></td></tr>"
                        for k, v in reqs["limits"].items())
        parts.append(f"<section><h2>Requirements: {escape(reqs.get('name') or 'requirements file')}</h2>"
                     f"<table class='kv'>{items}</table></section>")
    for name, note, chart in _charts(doc):
        parts.append(f"<section><h2>{escape(name)}</h2><p class='note'>{escape(note)}</p>{chart}</section>")
    parts.append("<section><h2>Details per configuration</h2>"
                 + "".join(f"<h3>{escape(c['label'])}</h3>{_kv(detail_rows(c))}" for c in configs) + "</section>")
    notes = "".join(f"<p><b>Note:</b> {escape(n)}</p>" for n in doc.get("notes") or [])
    parts.append("<section><h2>Method</h2>" + "".join(f"<p>{p}</p>" for p in method_paragraphs(doc)) + notes
                 + "</section>")
    parts.append("<section><h2>Environment</h2>"
                 + "".join(f"<h3>{escape(r['label'])}</h3>{_kv(fingerprint_rows(r))}" for r in runs)
                 + "<h3>Bundles</h3>" + _kv(sorted({(c["bundle"]["name"], f"{c['bundle']['bundle_id']} (manifest "
                                                   "sha256; covers every file)") for c in configs}))
                 + "</section>")
    parts.append("<p class='note'>Written by edgevlm bench. results.json beside this file holds every number "
                 "shown here.</p></main></body></html>")
    return "".join(parts)
