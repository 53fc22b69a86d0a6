#!/usr/bin/env bash
# Render a report's HTML page headless to a PNG, to look at it as a browser shows it.
#
#   scripts/render_report.sh [REPORT_DIR]      # default reports/ -> REPORT_DIR/report.png
#
# Needs Chromium (Debian: apt-get install chromium). The page is self-contained (plots
# inlined, no network), so the screenshot shows exactly what a reader opens. 2800 px wide:
# the conformance matrix has one column per candidate (18 in the committed report).
set -euo pipefail
dir="${1:-reports}"
page="$dir/report.html"
[ -f "$page" ] || { echo "render_report: no $page (run bnspec report first)" >&2; exit 2; }
browser="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
[ -n "$browser" ] || { echo "render_report: no Chromium found (Debian: apt-get install chromium)" >&2; exit 2; }
url="file://$(cd "$dir" && pwd)/report.html"
# --no-sandbox: Chromium refuses to run as root with its sandbox (containers, CI).
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=2800,8800 \
    --screenshot="$dir/report.png" "$url" 2>/dev/null
echo "render_report: wrote $dir/report.png"
