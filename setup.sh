#!/usr/bin/env bash
# Creates .venv, installs the pinned requirements and the project (editable, with its `drc` command;
# idempotent: skips when nothing changed), and a
# headless Chromium for the report test (tests/test_quickstart.py) when none is on PATH.
# torch==2.13.0 resolves to the CPU build; for CUDA clusters see cluster/README.md.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

# The same names tests/browser.py looks for (DRC_BROWSER overrides both).
browsers="chromium-headless-shell chromium chromium-browser google-chrome chrome-headless-shell"
have_browser() {
  [ -n "${DRC_BROWSER:-}" ] && [ -x "$(command -v "$DRC_BROWSER" || true)" ] && return 0
  for b in $browsers; do command -v "$b" >/dev/null 2>&1 && return 0; done
  return 1
}
install_browser() {
  have_browser && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing a headless Chromium for the report test (apt-get install chromium-headless-shell)" >&2
    local pkgs="chromium-headless-shell fonts-dejavu-core"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends $pkgs >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends $pkgs >/dev/null; } \
      || echo "setup: WARNING: installing chromium-headless-shell failed; the browser test will fail in CI" >&2
    have_browser && return 0
  fi
  echo "setup: note: no headless Chromium found; the report browser test needs one. Install it with" >&2
  echo "         sudo apt-get install chromium-headless-shell   (Debian/Ubuntu; or any Chromium/Chrome)" >&2
  echo "       or point DRC_BROWSER at a Chromium binary. Outside CI the test is skipped without it." >&2
}
install_browser

stamp=.venv/.requirements.sha256
want=$(cat requirements.txt requirements-test.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/drc ] \
    && .venv/bin/python -c "import torch, ray, mlflow, pytest" 2>/dev/null; then
  exit 0
fi
echo "setup: installing requirements into .venv (first run takes about a minute)" >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch first, on its own, so that nothing else can pull in a different (CUDA) build
.venv/bin/pip install -q --disable-pip-version-check "$(grep -E '^torch==' requirements.txt)" 2> >(grep -v "is ignored" >&2)
# the rest with uv where it installs (it is ~6× faster than pip here: 12 s against 71 s on 2 cores, a
# cold cache), on the indexes pip is configured with; pip where it does not
uv_indexes() {
  local v
  for v in $(.venv/bin/pip config get global.find-links 2>/dev/null); do printf -- '--find-links\n%s\n' "$v"; done
  for v in $(.venv/bin/pip config get global.extra-index-url 2>/dev/null); do printf -- '--extra-index-url\n%s\n' "$v"; done
}
if .venv/bin/pip install -q --disable-pip-version-check uv==0.13.10 2>/dev/null; then
  mapfile -t indexes < <(uv_indexes)
  .venv/bin/uv pip install -q --python .venv/bin/python --index-strategy unsafe-best-match ${indexes[@]+"${indexes[@]}"} \
      -r requirements.txt -r requirements-test.txt \
    || .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt -r requirements-test.txt 2> >(grep -v "is ignored" >&2)
else
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt -r requirements-test.txt 2> >(grep -v "is ignored" >&2)
fi
# the project itself, editable: the `drc` command (nothing new to download: every dependency is in)
.venv/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2> >(grep -v "is ignored" >&2)
echo "$want" > "$stamp"
