#!/usr/bin/env bash
# Regenerates this folder: the demo teacher exported at fp32 / int8 / int4, benchmarked on this machine,
# and report.html rendered to report.png. Run it with no training running (timings would measure the
# neighbour, and the benchmark would slow it down).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
model="${1:-$repo/edgevlm/assets/demo-teacher.safetensors}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
if pgrep -f "edgevlm train" >/dev/null; then echo "a training run is active; run this when it has finished" >&2; exit 1; fi
edgevlm export "$model" -o "$work/demo-fp32" --precision fp32
edgevlm export "$model" -o "$work/demo-int8" --precision int8
edgevlm export "$model" -o "$work/demo-int4" --precision int4
edgevlm bench --bundle "$work/demo-fp32" --bundle "$work/demo-int8" --bundle "$work/demo-int4" \
    --reference "$work/demo-fp32" --studies synthetic:16 --repeats 3 --batch-sizes 1,2,4,8 \
    --requirements "$here/requirements.toml" --label "edgevlm dev machine (CPU only)" -o "$here"
chromium --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
    --disable-sync --no-first-run --user-data-dir="$(mktemp -d)" --screenshot="$here/report.png" \
    --window-size=1400,3250 "file://$here/report.html"
