# Sourced by the GPU scripts (device tool, carry .whl; run from the repository root): installs the carried wheels
# unless NO_INSTALL=1 (made by `make gpu-wheels`), and exports the environment every GPU run uses.
# .whl/hf holds the project's pinned transformers/peft and what they need, put ahead of the image's older versions;
# HF_STACK=image runs on the image's own instead (to compare the two in one call).
REPO=${REPO:-$PWD}
if [ -z "${NO_INSTALL:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$REPO"/.whl/*.whl || return 1
  if ls "$REPO"/.whl/hf/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site_hf \
      "$REPO"/.whl/hf/*.whl || return 1
  fi
fi
site=/tmp/site_hf:/tmp/site
[ "${HF_STACK:-pinned}" = image ] && site=/tmp/site
export PYTHONPATH=$REPO:$site HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
export QLORA_RECIPES_CACHE=${QLORA_RECIPES_CACHE:-/tmp/qrc}
