#!/usr/bin/env bash
# Build an offline wheelhouse (for air-gapped clusters) of this project and its dependencies,
# except torch/triton/nvidia-* (the cluster has them). Install there with launch/install_offline.sh.
#
# Usage: launch/build_wheelhouse.sh [--minimal] [--have FILE] [--out DIR]
#   --minimal    also leave out what the GPU image already has (TARGET_HAS below) and the
#                matplotlib stack (PLOTS, ~24 MB: only for W&B block-mask images)
#   --have FILE  also leave out the packages named in FILE (`pip freeze` output of the target)
#   --out DIR    output folder (default wheelhouse/; env OUT)
# Env: PYTHON_VERSION (3.12), PLATFORMS (manylinux x86_64 tags), DEEPSPEED_VERSION (0.19.8), PYTHON.
# Needs network access to PyPI. Example: launch/build_wheelhouse.sh --minimal --out .whl
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
PLATFORMS=${PLATFORMS:-"manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64"}
DEEPSPEED_VERSION=${DEEPSPEED_VERSION:-0.19.8}
OUT=${OUT:-wheelhouse}
# Only sdists on PyPI, all pure Python: built into wheels here.
BUILD_HERE="deepspeed==$DEEPSPEED_VERSION antlr4-python3-runtime==4.9.3"
SKIP="torch triton nvidia-.* cuda-.* pbs-finetune deepspeed antlr4-python3-runtime"  # regexes
# Present on the GPU image (torch 2.11, transformers 5.17, accelerate 1.15 and their deps).
TARGET_HAS="transformers huggingface-hub hf-xet tokenizers safetensors accelerate numpy pyyaml tqdm
 regex filelock fsspec packaging requests urllib3 idna certifi charset-normalizer psutil jinja2
 markupsafe sympy mpmath networkx typing-extensions setuptools typer click rich shellingham
 markdown-it-py mdurl pygments annotated-doc"
PLOTS="matplotlib contourpy cycler fonttools kiwisolver pillow pyparsing python-dateutil six tzdata"

while (($#)); do
    case $1 in
        --minimal) SKIP="$SKIP $TARGET_HAS $PLOTS" ;;
        --have) SKIP="$SKIP $(sed -E 's/[ =<>@;\[].*//' "$2" | tr 'A-Z_.' 'a-z--' | tr '\n' ' ')"; shift ;;
        --out) OUT=$2; shift ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

mkdir -p "$OUT"
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
PLAT_ARGS=(--only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp)
for p in $PLATFORMS; do PLAT_ARGS+=(--platform "$p"); done

# 1. Wheels built here: the project and the sdist-only packages (DS_BUILD_OPS=0: no CUDA ops).
[[ -e build ]] || CLEAN_BUILD=1  # setuptools leaves build/ behind
"$PY" -m pip wheel --quiet --no-deps -w "$OUT" .
[[ -z ${CLEAN_BUILD:-} ]] || rm -rf build
DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps -w "$OUT" $BUILD_HERE

# 2. Resolve the full dependency set for the target (metadata only, with the liger extra for
#    model.liger=true), then download what is kept.
"$PY" -m pip install --quiet --dry-run --ignore-installed --report "$TMP/report.json" \
    --target "$TMP/t" --find-links "$OUT" "${PLAT_ARGS[@]}" "$(ls "$OUT"/pbs_finetune-*.whl)[liger]"
SKIP_RE="^($(echo $SKIP | tr ' ' '|'))$"
"$PY" - "$TMP/report.json" "$SKIP_RE" > "$TMP/reqs.txt" <<'PY'
import json, re, sys
skip = re.compile(sys.argv[2])
for item in json.load(open(sys.argv[1]))["install"]:
    meta = item["metadata"]
    name = re.sub(r"[-_.]+", "-", meta["name"]).lower()
    if not skip.match(name):
        print(f"{name}=={meta['version']}")
PY
"$PY" -m pip download --quiet --no-deps "${PLAT_ARGS[@]}" -d "$OUT" -r "$TMP/reqs.txt"

echo "wheelhouse $OUT: $(ls "$OUT" | wc -l) files, $(du -sh "$OUT" | cut -f1)"
ls -1 "$OUT"
