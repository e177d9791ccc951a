#!/usr/bin/env bash
# GPU smoke test, at most 5 minutes: see benchmarks/gpu_smoke.py and docs/benchmarks.md#gpu-smoke.
#
#   bash benchmarks/gpu_smoke.sh                          # one GPU: benchmarks/results/gpu_smoke.{md,json}
#   bash benchmarks/gpu_smoke.sh --cpu                    # the same parts on the CPU: gpu_smoke_cpu.{md,json}
#   bash benchmarks/gpu_smoke.sh --parts env,methods --budget-s 120
#   bash benchmarks/gpu_smoke.sh --wheels .whl --copy-to "$OUT"   # install carried wheels first; copy results out
#
# Runs with .venv's Python when there is one, else python3 (a GPU machine's own torch). Offline.
set -u
cd "$(dirname "$0")/.."

if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels)  # wheels of packages the machine lacks (ray, deepspeed, pydantic...): installed into a temp folder
            wheels="$2"; shift 2
            site="$(mktemp -d -t peftfleet-smoke-site-XXXXXX)"
            if ls "$wheels"/*.whl >/dev/null 2>&1; then
                "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
                    "$wheels"/*.whl || echo "gpu_smoke.sh: installing $wheels/*.whl failed; going on without them" >&2
                export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
                export PATH="$site/bin:$PATH"
            else
                echo "gpu_smoke.sh: no wheels in $wheels" >&2
            fi
            ;;
        *) args+=("$1"); shift ;;
    esac
done

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" benchmarks/gpu_smoke.py ${args[@]+"${args[@]}"}
