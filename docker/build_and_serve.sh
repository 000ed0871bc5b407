#!/usr/bin/env bash
# Build the TensorRT-LLM engines of a run (or of one engine directory) and serve one through Triton.
#
#   build_and_serve.sh DIR [SERVE_ENGINE_DIR]
#
# DIR is a run folder of `minitron run` or an engine directory of `minitron build`: every engine
# directory below it whose manifest.json says backend tensorrt-llm and built false gets its build.sh
# (the exact trtllm-build command written on CPU) run, its engine folder checked and its manifest
# marked built. Then SERVE_ENGINE_DIR (default: DIR when it is an engine directory) is served with
# the tensorrtllm backend on 127.0.0.1 (use `docker run --network host`). Runs inside docker/Dockerfile.
set -euo pipefail

usage() { echo "usage: $0 DIR [SERVE_ENGINE_DIR]" >&2; exit 2; }
[[ $# -ge 1 && $# -le 2 ]] || usage
root=$1
serve_dir=${2:-}
[[ -d $root ]] || { echo "error: $root is not a directory" >&2; exit 2; }
if [[ -z $serve_dir && -f $root/manifest.json ]]; then serve_dir=$root; fi

manifest_field() {  # manifest_field DIR FIELD -> value printed by python
  python3 -c 'import json, sys; print(json.load(open(sys.argv[1] + "/manifest.json"))[sys.argv[2]])' "$1" "$2"
}

built_any=0
while IFS= read -r -d '' manifest; do
  dir=$(dirname "$manifest")
  [[ $(manifest_field "$dir" backend) == tensorrt-llm ]] || continue
  if [[ $(manifest_field "$dir" built) == True ]]; then
    echo "== $dir: engine already built"
    continue
  fi
  echo "== $dir: building the TensorRT-LLM engine"
  bash "$dir/build.sh"
  python3 -c 'import sys; from toolchain.backends.tensorrt_llm import finish_trtllm_build; finish_trtllm_build(sys.argv[1])' "$dir"
  built_any=1
done < <(find "$root" -name manifest.json -print0)
[[ $built_any == 1 ]] && echo "engines built"

if [[ -z $serve_dir ]]; then
  echo "nothing to serve: pass SERVE_ENGINE_DIR (one of the engine directories above)"
  exit 0
fi
world_size=$(python3 -c 'import json, sys; p = json.load(open(sys.argv[1] + "/manifest.json"))["profile"]; print(p["tp"] * p["pp"])' "$serve_dir")
repository=$(mktemp -d /tmp/minitron-repo-XXXXXX)
rmdir "$repository"
minitron serve --engine "$serve_dir" --repo-only "$repository"
if [[ $world_size != 1 ]]; then
  echo "this engine spans $world_size GPUs: start Triton with one MPI rank per GPU, e.g. with launch_triton_server.py of the" \
       "TensorRT-LLM repository (triton_backend/scripts): --world_size $world_size --model_repo $repository" >&2
  exit 0
fi
exec tritonserver --model-repository="$repository" \
  --http-address=127.0.0.1 --grpc-address=127.0.0.1 --metrics-address=127.0.0.1 \
  --http-port="${HTTP_PORT:-8000}" --grpc-port="${GRPC_PORT:-8001}" --metrics-port="${METRICS_PORT:-8002}"
