#!/usr/bin/env bash
# Render the notebooks to HTML with their stored outputs, readable offline.
#
#   scripts/render_notebooks.sh [OUT_DIR]        # default notebooks/html/ (git-ignored)
#   SCREENSHOT=1 scripts/render_notebooks.sh     # also OUT_DIR/NAME.png via headless Chromium
#
# nbconvert's HTML loads MathJax from the network; offline, the formulas would show as
# raw TeX. When a local MathJax 2 is installed (Debian: apt-get install libjs-mathjax) the
# pages use it instead. Needs nbconvert (pip install -c requirements.lock nbconvert).
set -euo pipefail
out="${1:-notebooks/html}"
py="${PYTHON:-.venv/bin/python}"
mkdir -p "$out"
mathjax=()
local_mathjax=/usr/share/javascript/mathjax/MathJax.js
if [ -f "$local_mathjax" ]; then
    mathjax=("--HTMLExporter.mathjax_url=file://$local_mathjax?config=TeX-AMS_HTML")
fi
"$py" -m nbconvert --to html --output-dir "$out" "${mathjax[@]}" notebooks/*.ipynb
if [ "${SCREENSHOT:-0}" = 1 ]; then
    browser="$(command -v chromium || command -v chromium-browser || command -v google-chrome)"
    for page in "$out"/*.html; do
        # --no-sandbox: Chromium refuses to run as root with its sandbox (containers, CI);
        # the budget lets MathJax typeset before the screenshot.
        "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1200,3000 \
            --virtual-time-budget=15000 --allow-file-access-from-files \
            --screenshot="${page%.html}.png" "file://$(cd "$(dirname "$page")" && pwd)/$(basename "$page")" 2>/dev/null
    done
fi
echo "render_notebooks: wrote $out/"
