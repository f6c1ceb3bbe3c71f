#!/bin/sh
# Default command of Dockerfile.jetson: verify the mounted bundle, build its engine on this device, benchmark it.
# Settings (environment): TLEDGE_PRECISION (int8), TLEDGE_BATCH (e.g. 1,4,8), TLEDGE_DLA (a DLA core),
# TLEDGE_TIME_ITERATIONS (200), TLEDGE_BUNDLE (/bundle), TLEDGE_DATA (/data: images for accuracy, optional).
set -eu
bundle="${TLEDGE_BUNDLE:-/bundle}"
data="${TLEDGE_DATA:-/data}"
record="$(mktemp)"
trap 'rm -f "$record"' EXIT

set -- --precision "${TLEDGE_PRECISION:-int8}" --time "${TLEDGE_TIME_ITERATIONS:-200}" --json
if [ -n "${TLEDGE_BATCH:-}" ]; then set -- "$@" --batch "$TLEDGE_BATCH"; fi
if [ -n "${TLEDGE_DLA:-}" ]; then set -- "$@" --dla "$TLEDGE_DLA"; fi

echo "== 1/3 verify $bundle (every file against manifest.json)"
tledge verify "$bundle" --hashes-only

echo "== 2/3 build the engine with this device's TensorRT"
tledge engine "$bundle" "$@" > "$record"
engine="$(python3 -c 'import json, sys; r = json.load(open(sys.argv[1])); t = r.get("timing"); print(r["path"]); t and print("latency batch %d: p50 %.3f ms, p90 %.3f ms, p99 %.3f ms" % (t["batch"], t["p50_ms"], t["p90_ms"], t["p99_ms"]), file=sys.stderr)' "$record")"
tledge verify "$bundle" --engine "$engine"

echo "== 3/3 benchmark $engine"
if [ -d "$data" ] && [ -n "$(ls -A "$data" 2>/dev/null)" ]; then
    tledge bench "$bundle/$engine" --data "$data" --out-dir "$bundle/device-bench"
else
    echo "no images mounted at $data: latency above only (mount an ImageFolder tree at $data for accuracy)"
fi
