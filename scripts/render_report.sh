#!/usr/bin/env bash
# Render a report's HTML page headless to a PNG, to look at it as a browser shows it.
#
#   scripts/render_report.sh [REPORT_DIR]      # default reports/ -> REPORT_DIR/report.png
#
# Needs Chromium (Debian: apt-get install chromium). The page is self-contained (plots
# inlined, no network), so the screenshot shows exactly what a reader opens. 2400 px wide:
# the conformance matrices have one column per candidate (18 in the committed report).
set -euo pipefail
dir="${1:-reports}"
page="$dir/report.html"
[ -f "$page" ] || { echo "render_report: no $page (run bnspec report first)" >&2; exit 2; }
browser="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
[ -n "$browser" ] || { echo "render_report: no Chromium found (Debian: apt-get install chromium)" >&2; exit 2; }
url="file://$(cd "$dir" && pwd)/report.html"
# --no-sandbox: Chromium refuses to run as root with its sandbox (containers, CI).
# The network flags: the page needs none, and on a closed network Chromium's background
# connections only fail and slow the start.
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=2400,9000 \
    --disable-background-networking --disable-component-update --disable-sync --no-first-run \
    --user-data-dir="$profile" --screenshot="$dir/report.png" "$url" 2>/dev/null
echo "render_report: wrote $dir/report.png"
