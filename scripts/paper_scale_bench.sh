#!/usr/bin/env bash
# Paper-scale CPU benchmark (issue #13): full-size plans of both reference families with random
# weights, int8 added, then `msld bench` with baselines, int8 (speed + consensus agreement on the
# same noise) and peak RSS at k = 1, 8, 16. Plans are written under $PLANS (not committed: ~340 MB each).
#   bash scripts/paper_scale_bench.sh [lidc|cvc|all] [OUT_DIR]
# CVC_STEPS (default 5): the CVC family is ~5.6x heavier per step; its main rows and baselines run at
# CVC_STEPS steps (k=8), with one k=8 / 20-step row besides.
set -euo pipefail
which="${1:-all}"
out="${2:-benchmarks/results/paper_scale_$(date -u +%F)}"
PLANS="${PLANS:-.dev/plans}"
CVC_STEPS="${CVC_STEPS:-5}"
# CVC family: a CVC-ClinicDB image where the data set is present (else msld bench's default LIDC sample)
CVC_IMAGE="${CVC_IMAGE:-../shared/data/cvc-clinicdb/images/1.png}"
cvc_image=(); [ -f "$CVC_IMAGE" ] && cvc_image=(--image "$CVC_IMAGE")
mkdir -p "$out" "$PLANS"

make_plan() {  # family calibration-images calibration-steps
  local p="$PLANS/$1_bench.plan"
  if [ ! -f "$p" ]; then
    /usr/bin/time -v python -m msld_export.reference.bench_plan "$1" --out "$p" 2> "$out/make_plan_$1.time.txt" \
      | tee "$out/make_plan_$1.txt"
  fi
  if ! msld info "$p" --json | python -c "import json,sys; sys.exit(0 if json.load(sys.stdin).get('int8') else 1)"; then
    /usr/bin/time -v python -m msld_export.plan_writing.quantize_int8 "$p" --kind random --images "$2" --steps "$3" \
      2> "$out/quantize_$1.time.txt" | tee "$out/quantize_$1.txt"
  fi
}

if [ "$which" = lidc ] || [ "$which" = all ]; then
  make_plan lidc 2 10
  msld bench --plan "$PLANS/lidc_bench.plan" --k 8 --steps 20 --repeats 2 --baselines --baseline-repeats 1 \
    --int8-repeats 10 --rss-k 1 8 16 --json "$out/lidc_bench.json" 2>&1 | tee "$out/lidc_bench.txt"
  # the same figures on the shipped, trained 1.8 M-parameter plan: int8 consensus agreement on a trained model
  msld bench --plan lidc --k 8 --steps 20 --repeats 3 --json "$out/shipped_lidc_int8_agreement.json" 2>&1 \
    | tee "$out/shipped_lidc_int8_agreement.txt"
fi
if [ "$which" = cvc ] || [ "$which" = all ]; then
  make_plan cvc 1 4
  msld bench --plan "$PLANS/cvc_bench.plan" "${cvc_image[@]}" --k 8 --steps "$CVC_STEPS" 20 --repeats 1 --baselines --baseline-repeats 1 \
    --int8-repeats 3 --rss-k 1 8 16 --rss-steps 2 --json "$out/cvc_bench.json" 2>&1 | tee "$out/cvc_bench.txt"
fi
