# Sourced by the scripts: builds the isolated environment once (scripts/setup_env.sh) and sets
# ROOT (the checkout), ITERIS_ENV (the environment folder) and PYTHON (its interpreter).
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ITERIS_ENV=${ITERIS_ENV:-$HOME/.cache/comfyui-iteris}
export ITERIS_ENV
bash "$ROOT/scripts/setup_env.sh"
PYTHON="$ITERIS_ENV/venv/bin/python"
cd "$ROOT"
