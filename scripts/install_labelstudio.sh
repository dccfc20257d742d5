#!/usr/bin/env bash
# Install the Label Studio *server* into its own virtualenv: it pins pyarrow<25, which clashes with the
# project's venv. Idempotent: does nothing when that version is already installed there.
#   scripts/install_labelstudio.sh [VENV_DIR]
#   VENV_DIR defaults to $SURD_LABELSTUDIO_VENV, else .cache/labelstudio-venv (git-ignored, kept between runs).
#   SURD_LABELSTUDIO_VERSION picks the version (default: the one the review tests are written against).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${SURD_LABELSTUDIO_VENV:-$ROOT/.cache/labelstudio-venv}}"
VERSION="${SURD_LABELSTUDIO_VERSION:-1.23.2}"
PY="${PYTHON:-python3}"

installed() {
    "$VENV/bin/python" -c "import label_studio, sys; sys.exit(label_studio.__version__ != '$VERSION')" 2>/dev/null
}

if [ -x "$VENV/bin/label-studio" ] && installed; then
    echo "label-studio $VERSION already installed in $VENV"
    exit 0
fi

echo "installing label-studio $VERSION into $VENV (a few minutes)"
rm -rf "$VENV"
"$PY" -m venv "$VENV"
# pip's notes about unused local index folders are noise here; real errors still fail the script.
pip_install() {
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@" 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
pip_install --upgrade pip
pip_install "label-studio==$VERSION"
if ! installed; then
    echo "label-studio $VERSION did not install into $VENV" >&2
    exit 1
fi
echo "label-studio $VERSION installed in $VENV"
