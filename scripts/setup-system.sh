#!/usr/bin/env bash
# System packages the test suite drives, set up by `make test` before pytest runs:
#   chromium                        the playground test (Playwright drives /usr/bin/chromium, headless)
#   tesseract-ocr tesseract-ocr-eng the Tesseract OCR baseline (the real binary and its English data)
#   libgl1 libglib2.0-0             OpenCV (opencv-python, which the RapidOCR baseline needs) loads libGL / GLib
#   nodejs npm                      transformers.js, run on the ONNX export (tests/js; Node >= 20: its image
#                                   library sharp 0.35 needs it; Debian 12's own nodejs is 18, Debian 13's is 20)
# Present: nothing happens. Missing, as root with apt-get: installed (Debian/Ubuntu names). Missing
# otherwise, or with --check: fails at once, printing the one command to run.
set -euo pipefail

CHROMIUM=${PALIKIT_CHROMIUM:-/usr/bin/chromium}  # the path tests/test_serve_playground.py launches

present() {
  case "$1" in
    chromium) [ -x "$CHROMIUM" ] ;;
    tesseract-ocr) command -v tesseract >/dev/null 2>&1 ;;
    tesseract-ocr-eng) command -v tesseract >/dev/null 2>&1 && tesseract --list-langs 2>/dev/null | grep -qx eng ;;
    libgl1) ldconfig -p | grep -q 'libGL\.so\.1 ' ;;
    libglib2.0-0) ldconfig -p | grep -q 'libgthread-2\.0\.so\.0 ' ;;
    nodejs) command -v node >/dev/null 2>&1 && [ "$(node -p 'process.versions.node.split(".")[0]')" -ge 20 ] ;;
    npm) command -v npm >/dev/null 2>&1 ;;
  esac
}

missing=()
for pkg in chromium tesseract-ocr tesseract-ocr-eng libgl1 libglib2.0-0 nodejs npm; do
  present "$pkg" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

cmd="apt-get update && apt-get install -y --no-install-recommends ${missing[*]}"
if [ "${1:-}" != "--check" ] && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup-system: installing ${missing[*]} (the test suite drives them)" >&2
  if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${missing[@]}" >/dev/null; then
    still=()
    for pkg in "${missing[@]}"; do present "$pkg" || still+=("$pkg"); done
    [ ${#still[@]} -eq 0 ] && exit 0
    echo "setup-system: error: installed, but still not found: ${still[*]} (chromium is expected at $CHROMIUM;" \
         "nodejs must be Node >= 20: on Debian 12, whose nodejs is 18, install Node 20, e.g. deb.nodesource.com/node_20.x)" >&2
    exit 1
  fi
  echo "setup-system: error: apt-get could not install ${missing[*]}; fix the package source and run: $cmd" >&2
  exit 1
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo "
echo "setup-system: error: the test suite needs the system packages ${missing[*]}; run:" >&2
echo "  ${sudo}sh -c '$cmd'" >&2
exit 1
