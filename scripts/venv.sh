# Sourced by the other scripts: create .venv beside the project and install corral into it.
# EXTRAS selects pip extras, such as "test".
set -euo pipefail
project_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$project_dir/.venv"
if [ ! -x "$venv/bin/python" ]; then
    echo "==> creating a virtual environment in $venv" >&2
    python3 -m venv "$venv"
fi
spec="$project_dir"
if [ -n "${EXTRAS:-}" ]; then
    spec="$project_dir[$EXTRAS]"
fi
echo "==> installing corral${EXTRAS:+ with [$EXTRAS]} into $venv" >&2
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$spec"
