#!/usr/bin/env bash
# The system libraries FFCV builds and runs against, from Debian's packages: pkg-config,
# libjpeg-turbo (libturbojpeg0-dev) and OpenCV (libopencv-dev). Skipped when pkg-config already
# finds both; otherwise installed with apt-get (needs root). `make ffcv` and `make test` run it.
set -euo pipefail
PACKAGES=(pkg-config libturbojpeg0-dev libopencv-dev)

have_libs() {
  command -v pkg-config >/dev/null 2>&1 \
    && pkg-config --exists libturbojpeg \
    && { pkg-config --exists opencv4 || pkg-config --exists opencv; }
}

if have_libs; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "FFCV needs ${PACKAGES[*]} (Debian/Ubuntu package names)." >&2
  echo "Install them as root: apt-get install -y ${PACKAGES[*]}; then run make again." >&2
  exit 1
fi
echo "installing FFCV's system libraries: ${PACKAGES[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get -o DPkg::Lock::Timeout=180 update -qq
apt-get -o DPkg::Lock::Timeout=180 install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
have_libs
