#!/usr/bin/env bash
# The git-ignored .whl/ folder the GPU machines need (../shared/GPU.md: their image has no trl, bitsandbytes,
# datasets, hydra, deepspeed, liger-kernel; nothing can be downloaded there). Run here, then name it in the
# device tool's `carry` ([".whl"]); scripts/gpu_bench.sh and the commands in docs/gpu.md install from it.
# The GPU image runs python 3.12 on manylinux x86_64. DeepSpeed is built here as a pure-Python wheel
# (DS_BUILD_OPS=0; its build imports torch, so PYTHON must have torch: `make install` gives .venv).
set -eu
DIR=${DIR:-.whl}
PYTHON=${PYTHON:-.venv/bin/python}
mkdir -p "$DIR"
target="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d $DIR"
"$PYTHON" -m pip download -q $target --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 \
  trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 hydra-core==1.3.8 omegaconf==2.3.1 \
  fsspec==2026.9.0 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 liger-kernel==0.8.5 hjson==3.1.0 \
  py-cpuinfo==9.0.0 pydantic==2.12.5 pydantic-core==2.41.5 annotated-types==0.7.0 typing-inspection==0.4.2
"$PYTHON" -m pip download -q $target --platform manylinux_2_24_x86_64 bitsandbytes==0.50.2
"$PYTHON" -m pip wheel -q --no-deps antlr4-python3-runtime==4.9.3 -w "$DIR"
# The project's pinned Hugging Face stack (pyproject.toml), which the image has older versions of (transformers 5.17,
# peft 0.21.0): in $DIR/hf, installed ahead of the image's unless a run sets HF_STACK=image (scripts/gpu_env.sh).
# huggingface-hub 1.33 (transformers 5.23 takes >= 1.31): the 2.x line imports httpx2, which the image lacks.
rm -f "$DIR"/hf/huggingface_hub-2.*.whl
"$PYTHON" -m pip download -q $target -d "$DIR/hf" --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  transformers==5.23.0 peft==0.21.2 huggingface-hub==1.33.0 tokenizers==0.23.3 safetensors==0.8.0 regex==2026.11.19
# bitsandbytes ships a kernel library per CUDA/ROCm version (43 MB); the image's torch is cu130, and the device tool
# carries 64 MiB at most: keep the CUDA 13 and CPU libraries (and drop the others' lines from the wheel's RECORD).
"$PYTHON" - "$DIR"/bitsandbytes-0.50.2-*.whl <<'PY'
import re, shutil, sys, zipfile
path = sys.argv[1]
drop = re.compile(r"bitsandbytes/libbitsandbytes_(cuda1[12]\d|rocm\d+|xpu\d+)\.so")
with zipfile.ZipFile(path) as wheel:
    if not any(drop.fullmatch(name) for name in wheel.namelist()):
        sys.exit(0)  # slimmed already
    with zipfile.ZipFile(path + ".tmp", "w", zipfile.ZIP_DEFLATED) as slim:
        for item in wheel.infolist():
            if drop.fullmatch(item.filename):
                continue
            data = wheel.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if not drop.fullmatch(line.split(",")[0])).encode()
            slim.writestr(item, data)
shutil.move(path + ".tmp", path)
PY
[ -n "$(ls "$DIR"/deepspeed-0.19.8-*.whl 2>/dev/null)" ] ||
  DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w "$DIR"
ls "$DIR"; du -sh "$DIR"  # the device tool carries at most 64 MiB
