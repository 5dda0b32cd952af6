#!/usr/bin/env bash
# The whole GPU measurement in one go on a GPU machine without internet access (dask, distributed and
# their missing dependencies carried as Python 3.12 wheels in .whl/, see benchmarks/README.md): the GPU case, the memory-pressure section and the pipeline case on the GPU host's
# CPUs, each under its own time limit, results and one log into $OUT (and, on request, the stacking probe).
#   DYNBATCH_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_run.sh   (on the device machine)
# <PART>_LIMIT and <PART>_ARGS (TEXT, COLLECTION, MULTI, COMPILED) set a part's time limit and extra arguments.
# PARTS picks some of "probe case pressure pipeline compiled verify first text collection multi" (default: case, pressure and pipeline,
# ~560 s; a device call may take 600). "compiled" (raw, compiled raw loop, compile=True; up to 560 s,
# most of it compiling) needs a call of its own.
set -u
PARTS=${PARTS:-case pressure pipeline}
OUT=${OUT:-benchmarks/results/gpu_run}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PATH=/tmp/site/bin:$PATH  # py-spy, when carried
log=$OUT/log.txt
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv >>"$log" 2>&1
[[ $PARTS == *probe* ]] && timeout 60 python3 benchmarks/stack_probe.py --out "$OUT" --name stack_probe_gpuhost >>"$log" 2>&1
echo "stack probe rc $?" | tee -a "$log"
[[ $PARTS == *case* ]] && timeout 370 python3 benchmarks/gpu_case.py --out "$OUT" \
  --sections raw,plain,dynbatch,open,openfrozen,frontendgpu,cupy,daskcuda >>"$log" 2>&1
echo "gpu_case rc $?" | tee -a "$log"
# "verify": what the headline targets need, in one call of under 600 s: the ceiling, default
# settings closed and open loop, memory pressure, the compiled ceiling and compile=True
if [[ $PARTS == *verify* ]]; then
  timeout 150 python3 benchmarks/gpu_case.py --out "$OUT" --sections raw,dynbatch,open >>"$log" 2>&1
  echo "gpu_case rc $?" | tee -a "$log"
  timeout 100 python3 benchmarks/gpu_case.py --out "$OUT" --name gpu_case_pressure --sections pressure >>"$log" 2>&1
  echo "pressure rc $?" | tee -a "$log"
  cp "$OUT/gpu_case.json" "$OUT/gpu_case_compiled.json"  # the eager ceiling, for the ratio
  timeout 320 python3 benchmarks/gpu_case.py --out "$OUT" --name gpu_case_compiled --sections rawcompiled,compiled >>"$log" 2>&1
  echo "compiled rc $?" | tee -a "$log"
fi
# "text": variable-length text (about 150 s)
[[ $PARTS == *text* ]] && timeout "${TEXT_LIMIT:-240}" python3 benchmarks/gpu_text_case.py --out "$OUT" ${TEXT_ARGS:-} >>"$log" 2>&1
echo "text rc $?" | tee -a "$log"
[[ $PARTS == *compiled* ]] && timeout "${COMPILED_LIMIT:-560}" python3 benchmarks/gpu_case.py --out "$OUT" --name gpu_case_compiled \
  --sections raw,rawcompiled,compiled ${COMPILED_ARGS:-} >>"$log" 2>&1
echo "compiled rc $?" | tee -a "$log"
[[ $PARTS == *pressure* ]] && timeout 100 python3 benchmarks/gpu_case.py --out "$OUT" --name gpu_case_pressure --sections pressure >>"$log" 2>&1
echo "pressure rc $?" | tee -a "$log"
[[ $PARTS == *pipeline* ]] && timeout 90 python3 benchmarks/pipeline_case.py --setups split,io --out "$OUT" --name pipeline_case_gpuhost >>"$log" 2>&1
echo "pipeline rc $?" | tee -a "$log"
[[ $PARTS == *first* ]] && timeout 240 python3 benchmarks/first_result.py --out "$OUT" --rows 200000 >>"$log" 2>&1
echo "first result rc $?" | tee -a "$log"
[[ $PARTS == *collection* ]] && timeout "${COLLECTION_LIMIT:-400}" python3 benchmarks/gpu_collection_case.py --out "$OUT" ${COLLECTION_ARGS:-} >>"$log" 2>&1
echo "collection rc $?" | tee -a "$log"
# "multi": three models on one memory-limited GPU under a changing mix (about 6 minutes; a call of its own)
[[ $PARTS == *multi* ]] && timeout "${MULTI_LIMIT:-430}" python3 benchmarks/multi_model_case.py --out "$OUT" ${MULTI_ARGS:-} >>"$log" 2>&1
echo "multi rc $?" | tee -a "$log"
rm -f "$OUT/hog.py"
