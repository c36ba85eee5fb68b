#!/bin/sh
# Provision the legacy Caffe stack inside a Debian bullseye system. The Dockerfile and
# the root-folder builder (`porting env build`) both run this one script, as root,
# from its own folder with the pinned files beside it:
#   debian-packages.txt   Debian packages, name=version
#   requirements-py2.txt  Python 2.7 wheels, name==version --hash=sha256:...
#   record_versions.py    writes /opt/porting/stack.json (what `porting env status` prints)
# Environment (all optional):
#   PORTING_DEBIAN_SNAPSHOT  e.g. 20240801T000000Z: use snapshot.debian.org at that date
#   PORTING_CA_BUNDLE        CA bundle for the wheel download (an egress proxy's CA)
set -eu
RECIPE=$(cd "$(dirname "$0")" && pwd)
PREFIX=/opt/porting
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 LANG=C.UTF-8
mkdir -p "$PREFIX/reference" "$PREFIX/jobs"

APT_OPTS=""
if [ -n "${PORTING_DEBIAN_SNAPSHOT:-}" ]; then
  echo "deb http://snapshot.debian.org/archive/debian/${PORTING_DEBIAN_SNAPSHOT} bullseye main" \
    > /etc/apt/sources.list
  APT_OPTS="-o Acquire::Check-Valid-Until=false"
fi

echo "== apt: pinned Debian packages"
# shellcheck disable=SC2086
apt-get $APT_OPTS update -q
# shellcheck disable=SC2086
apt-get $APT_OPTS install -y -q --no-install-recommends \
  $(grep -v '^[[:space:]]*#' "$RECIPE/debian-packages.txt" | tr '\n' ' ')

echo "== BLAS: OpenBLAS (pthread) pinned; the reference BLAS rounds differently"
update-alternatives --set libblas.so.3-x86_64-linux-gnu \
  /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3
update-alternatives --set liblapack.so.3-x86_64-linux-gnu \
  /usr/lib/x86_64-linux-gnu/openblas-pthread/liblapack.so.3

echo "== Python 2.7 wheels (downloaded by Python 3's pip, installed offline)"
# Python 2.7's pip cannot verify TLS through some proxies; Python 3's pip can.
WHEELS=$(mktemp -d)
python3 -m pip download -q --no-cache-dir --disable-pip-version-check \
  --dest "$WHEELS" --only-binary=:all: --platform manylinux1_x86_64 \
  --python-version 27 --implementation cp --abi cp27mu --no-deps \
  --require-hashes -r "$RECIPE/requirements-py2.txt" \
  ${PORTING_CA_BUNDLE:+--cert "$PORTING_CA_BUNDLE"}
PIP_WHEEL=$(ls "$WHEELS"/pip-*.whl)
python2.7 "$PIP_WHEEL/pip" install -q --no-index --find-links "$WHEELS" \
  --require-hashes --no-deps --no-cache-dir --no-warn-script-location \
  --disable-pip-version-check -r "$RECIPE/requirements-py2.txt"
rm -rf "$WHEELS"

echo "== checks"
python2.7 -c 'import numpy, scipy, scipy.ndimage, skimage, skimage.restoration, PIL.Image, pywt, networkx, six'
python3 -c 'import caffe, caffe.proto.caffe_pb2, google.protobuf.text_format'
python3 "$RECIPE/record_versions.py" "$RECIPE" "$PREFIX/stack.json"

apt-get clean
rm -rf /var/lib/apt/lists/*
echo "== legacy stack provisioned"
