#!/usr/bin/env bash
# Installs the system packages the studio and its tests need on Debian/Ubuntu:
#   mesa-vulkan-drivers, libvulkan1  a Vulkan driver (lavapipe on machines without a GPU) for wgpu
#   xvfb                             a virtual display for headless windows (scripts/screenshot.sh)
# Everything else comes from crates.io through cargo.
set -euo pipefail
packages=(mesa-vulkan-drivers libvulkan1 xvfb)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
