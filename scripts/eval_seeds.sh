#!/usr/bin/env bash
# `msld eval` of a model on its full validation split, for several seeds, step counts and
# precisions, then a summary over everything evaluated so far. A split's mean moves with the
# seed (polyp consensus Dice by about 1 point), so step counts, precisions and models are
# compared at the same seeds, against that spread.
#   bash scripts/eval_seeds.sh lidc 0 1 2                          # fp32 and int8, default steps
#   STEPS="5 10 20" PRECISIONS=fp32 bash scripts/eval_seeds.sh polyp 0 1 2 3 4
# Environment (all optional):
#   KIND=cvc|kvasir|lidc|polyp  data set (default: the model's own)
#   K=16                        hypotheses per image (default: the plan's)
#   PER_NODULE=1                LIDC: one slice per nodule, the middle one
#   VIEWS=V                     test-time views (msld_sdk.views; default: the plan's)
#   PLAN=path/to/x.plan         evaluate this plan file under NAME (default: the shipped NAME)
#   TAG=name                    results go to benchmarks/results/eval_seeds_TAG
#                               (default: NAME, plus _KIND, _kK, _per_nodule and _viewsV when given)
#   LIMIT=N                     first N validation items only
#   SOLVERS="ddim dpmpp2m"      samplers (default: ddim); files of a solver other than ddim are
#                               named SOLVER_stepsN_seedS_P.json
#   RHO=2                       dpmpp2m on the power timestep grid of this rho (msld_sdk.timestep_grids,
#                               `msld tune --grids`); files dpmpp2m@rhoR_stepsN_seedS_P.json
# Results already on disk are kept (resumable). The evaluation protocol of the model card
# (held-out video sequences, one slice per nodule, k=16 for LIDC): scripts/eval_protocol.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=${1:?model name}; shift
PLAN=${PLAN:-$NAME}
TAG=${TAG:-$NAME${KIND:+_$KIND}${K:+_k$K}${PER_NODULE:+_per_nodule}${VIEWS:+_views$VIEWS}}
OUT=benchmarks/results/eval_seeds_$TAG
mkdir -p "$OUT"
STEPS=${STEPS:-$(python -c "from msld_sdk import Segmenter; print(Segmenter('$PLAN').defaults['steps'])")}
# results on disk are reused only if they were made with this very model (a shipped name's plan
# changes when a new model ships; plan_graphs_sha256 identifies the fp32 graphs) and the same
# test-time views (results made before views existed used 1): otherwise stop
python - "$OUT" "$PLAN" "${VIEWS:-}" <<'PY'
import json, pathlib, sys
from msld_sdk.plan import Plan
from msld_sdk.segmenter import resolve_plan_path
plan = Plan.open(resolve_plan_path(sys.argv[2]))
want, views = plan.graphs_sha256, int(sys.argv[3] or plan.defaults.get("views", 1))
for f in sorted(pathlib.Path(sys.argv[1]).glob("*steps*_seed*_*.json")):
    rep = json.loads(f.read_text())
    got = rep.get("plan_graphs_sha256")
    if got is None:
        print(f"note: {f} records no model checksum (made before 2026-11-30); reused as it is", file=sys.stderr)
    elif got != want:
        sys.exit(f"{f} was made with another model than {sys.argv[2]}: move those results away or give TAG=another_name")
    if rep.get("views", 1) != views:
        sys.exit(f"{f} was made with views={rep.get('views', 1)}, this run uses views={views}: give TAG=another_name")
PY
for sv in ${SOLVERS:-ddim}; do
for st in $STEPS; do
  for s in "$@"; do
    for p in ${PRECISIONS:-fp32 int8}; do
      grid=""
      if [ -n "${RHO:-}" ] && [ "$sv" = dpmpp2m ]; then
        grid=$(python -c "from msld_sdk.segmenter import Segmenter; from msld_sdk.timestep_grids import power_grid, describe; print(describe(power_grid(Segmenter('$PLAN').schedule.num_train_timesteps, $st, $RHO)))")
        f="$OUT/${sv}@rho${RHO}_steps${st}_seed${s}_$p.json"
      else
        f="$OUT/$([ "$sv" = ddim ] || echo "${sv}_")steps${st}_seed${s}_$p.json"
      fi
      [ -f "$f" ] && continue
      python -m msld_sdk.cli eval ${grid:+--timesteps "$grid"} --plan "$PLAN" --kind "${KIND:-$NAME}" --split val -q --seed "$s" --steps "$st" \
          --solver "$sv" --precision "$p" ${K:+--k "$K"} ${VIEWS:+--views "$VIEWS"} ${PER_NODULE:+--per-nodule} ${LIMIT:+--limit "$LIMIT"} \
          ${THREADS:+--threads "$THREADS"} --json "$f" > /dev/null
    done
  done
done
done
python -m benchmarks.eval_summary "$OUT" | tee "$OUT/summary.txt"
