#!/usr/bin/env bash
# Makes docs/screenshot.png: the studio in a real window under Xvfb, mid-generation, with the tiny
# test model (random weights, so the preview is coloured noise). Needs Debian/Ubuntu packages
# xvfb, imagemagick (import) and xdotool, which it installs when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
missing=()
for tool in import:imagemagick xdotool:xdotool; do
  command -v "${tool%%:*}" >/dev/null || missing+=("${tool##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
cargo build --release -p studio
target=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
studio="$target/release/studio"
model="$PWD/tests/fixtures/models/sd1"

scratch=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$scratch"' EXIT
export XDG_DATA_HOME="$scratch"
gallery="$XDG_DATA_HOME/ai-studio/gallery"
mkdir -p "$gallery"
# A few finished images for the gallery (it picks up PNGs with metadata in its folder).
for seed in 11 12 13 14; do
  "$studio" generate --model "$model" --prompt "harbour at dawn, study $seed" --seed "$seed" \
    --steps 4 --width 256 --height 256 --out "$gallery/study-$seed.png" 2>/dev/null
done

export DISPLAY=:77
Xvfb "$DISPLAY" -screen 0 1280x800x24 >/dev/null 2>&1 &
sleep 1
"$studio" "$model" >/dev/null 2>&1 &
window=""
for _ in $(seq 100); do
  window=$(xdotool search --name "AI Studio" 2>/dev/null | head -1 || true)
  [ -n "$window" ] && break
  sleep 0.2
done
[ -n "$window" ] || { echo "the studio window did not appear" >&2; exit 1; }
sleep 3
xdotool windowfocus --sync "$window"
xdotool type --delay 10 "a lighthouse on a cliff at dusk, (dramatic clouds:1.2), oil painting"
xdotool key ctrl+Return
# The title shows the step while generating: take the picture a few steps in.
for _ in $(seq 600); do
  case "$(xdotool getwindowname "$window")" in
    *"step 3/"*) break ;;
  esac
  sleep 0.2
done
import -window root docs/screenshot.png
echo "wrote docs/screenshot.png"
