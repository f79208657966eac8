#!/usr/bin/env bash
# Assemble an ONNX Runtime SDK (ONNXRUNTIME_ROOT: include/ + lib/) for Linux x86_64 or aarch64
# from package registries only, for building the onnxruntime target's generated glue.
#
#   scripts/fetch_ort_sdk.sh [--arch x86_64|aarch64] [--dest DIR] [--cache DIR]
#
# Where the pieces come from (ONNX Runtime 1.29.0, C API version 29, both MIT licensed):
#   headers  npm: com.github.asus4.onnxruntime@0.4.9, the Unity plugin that ships ONNX Runtime
#            1.29.0's iOS xcframework; its Headers/ are ONNX Runtime's public, platform-independent
#            C/C++ headers (onnxruntime_c_api.h, onnxruntime_cxx_api.h, ...).
#   library  PyPI: onnxruntime==1.29.0 manylinux wheel for the arch, which ships
#            onnxruntime/capi/libonnxruntime.so.1.29.0 (SONAME libonnxruntime.so.1).
# The header and library versions match exactly (the C API refuses headers newer than the lib).
# Needs npm and python3 -m pip; the first run downloads about 170 MB (the npm
# tarball is large), later runs reuse --cache. Prints the SDK directory on success.
set -euo pipefail

ORT_VERSION=1.29.0
ORT_API_VERSION=29
NPM_HEADERS_PACKAGE=com.github.asus4.onnxruntime@0.4.9
ARCH=$(uname -m)
DEST=""
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/apq-sdk/ort"

while [ $# -gt 0 ]; do
  case "$1" in
    --arch) ARCH="$2"; shift 2 ;;
    --dest) DEST="$2"; shift 2 ;;
    --cache) CACHE="$2"; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "fetch_ort_sdk.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
case "$ARCH" in
  x86_64|amd64) ARCH=x86_64 ;;
  aarch64|arm64) ARCH=aarch64 ;;
  *) echo "fetch_ort_sdk.sh: --arch must be x86_64 or aarch64, found $ARCH" >&2; exit 2 ;;
esac
DEST="${DEST:-$CACHE/onnxruntime-linux-$ARCH-$ORT_VERSION}"

if [ -f "$DEST/include/onnxruntime_cxx_api.h" ] && [ -e "$DEST/lib/libonnxruntime.so" ]; then
  echo "$DEST"
  exit 0
fi
command -v npm >/dev/null || { echo "fetch_ort_sdk.sh: npm is needed for the headers" >&2; exit 3; }
mkdir -p "$CACHE"

# 1. headers from the npm package
HEADERS_TGZ=$(ls "$CACHE"/com.github.asus4.onnxruntime-0.4.9.tgz 2>/dev/null || true)
if [ -z "$HEADERS_TGZ" ]; then
  (cd "$CACHE" && npm pack --silent "$NPM_HEADERS_PACKAGE" >/dev/null) \
    || { echo "fetch_ort_sdk.sh: npm pack $NPM_HEADERS_PACKAGE failed" >&2; exit 3; }
  HEADERS_TGZ="$CACHE/com.github.asus4.onnxruntime-0.4.9.tgz"
fi
# 2. library from the PyPI wheel
WHEEL_DIR="$CACHE/wheel-$ARCH"
if ! ls "$WHEEL_DIR"/onnxruntime-$ORT_VERSION-*.whl >/dev/null 2>&1; then
  python3 -m pip download --quiet --no-deps --only-binary :all: \
      --platform "manylinux_2_28_$ARCH" --python-version 3.11 \
      -d "$WHEEL_DIR" "onnxruntime==$ORT_VERSION" \
    || { echo "fetch_ort_sdk.sh: pip download onnxruntime==$ORT_VERSION ($ARCH) failed" >&2; exit 3; }
fi
WHEEL=$(ls "$WHEEL_DIR"/onnxruntime-$ORT_VERSION-*.whl | head -n 1)

TMP=$(mktemp -d "$CACHE/.assemble.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$TMP/sdk/include" "$TMP/sdk/lib"
HEADERS_IN='package/Plugins/iOS~/onnxruntime.xcframework/ios-arm64/onnxruntime.framework/Headers'
tar -xzf "$HEADERS_TGZ" -C "$TMP" --wildcards "$HEADERS_IN/*.h" package/LICENSE
cp "$TMP/$HEADERS_IN"/*.h "$TMP/sdk/include/"
grep -q "#define ORT_API_VERSION $ORT_API_VERSION\$" "$TMP/sdk/include/onnxruntime_c_api.h" \
  || { echo "fetch_ort_sdk.sh: the npm headers are not ONNX Runtime API $ORT_API_VERSION" >&2; exit 4; }
python3 - "$WHEEL" "$TMP/sdk" "$ORT_VERSION" <<'EOF'
import sys, zipfile
wheel, sdk, version = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
    lib = f"onnxruntime/capi/libonnxruntime.so.{version}"
    if lib not in names:
        sys.exit(f"fetch_ort_sdk.sh: {wheel} has no {lib}")
    with open(f"{sdk}/lib/libonnxruntime.so.{version}", "wb") as out:
        out.write(z.read(lib))
    for name in ("onnxruntime/LICENSE", "onnxruntime/ThirdPartyNotices.txt"):
        if name in names:
            with open(f"{sdk}/{name.split('/')[-1]}", "wb") as out:
                out.write(z.read(name))
EOF
ln -s "libonnxruntime.so.$ORT_VERSION" "$TMP/sdk/lib/libonnxruntime.so.1"
ln -s "libonnxruntime.so.1" "$TMP/sdk/lib/libonnxruntime.so"
cp "$TMP/package/LICENSE" "$TMP/sdk/LICENSE.unity-plugin"
cat > "$TMP/sdk/SOURCES.txt" <<EOF
ONNX Runtime $ORT_VERSION SDK for linux-$ARCH, assembled by apq-sdk scripts/fetch_ort_sdk.sh
include/  npm $NPM_HEADERS_PACKAGE: $HEADERS_IN
lib/      PyPI $(basename "$WHEEL"): onnxruntime/capi/libonnxruntime.so.$ORT_VERSION
EOF
rm -rf "$DEST"
mkdir -p "$(dirname "$DEST")"
mv "$TMP/sdk" "$DEST"
echo "$DEST"
