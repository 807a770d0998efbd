#!/usr/bin/env bash
# Fetch the ONNX Runtime C/C++ headers (Debian trixie's libonnxruntime-dev) into a cache folder and print the
# include directory (ONNX.md §7.1). Nothing is installed and the machine's apt setup is not touched: apt runs with
# every state location pointed into the cache folder, `apt-get download` fetches only that one .deb (no
# dependencies) and `dpkg -x` unpacks it without touching the dpkg database.
#
#   fetch_headers.sh [CACHE_DIR]      # default: <repo>/build/ort-headers
#
# ORT_INCLUDE_DIR, if set, names headers you already have: it is checked and printed, nothing is fetched.
# The archive address comes from this machine's own apt configuration (the URIs of its Debian sources), with the
# suite swapped for trixie; DEBIAN_MIRROR overrides it.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cache="${1:-$repo/build/ort-headers}"
need=(onnxruntime_c_api.h onnxruntime_cxx_api.h onnxruntime_lite_custom_op.h)

check() {  # check DIR: all needed headers present
    local f
    for f in "${need[@]}"; do [ -f "$1/$f" ] || return 1; done
}

if [ -n "${ORT_INCLUDE_DIR:-}" ]; then
    if check "$ORT_INCLUDE_DIR"; then echo "$ORT_INCLUDE_DIR"; exit 0; fi
    echo "ORT_INCLUDE_DIR=$ORT_INCLUDE_DIR lacks one of: ${need[*]}" >&2
    exit 3
fi

inc="$cache/root/usr/include/onnxruntime"
if check "$inc"; then echo "$inc"; exit 0; fi

command -v apt-get >/dev/null && command -v dpkg >/dev/null || {
    echo "no apt-get/dpkg here: set ORT_INCLUDE_DIR to a folder holding ${need[*]}" >&2; exit 3; }

mirror="${DEBIAN_MIRROR:-}"
if [ -z "$mirror" ]; then
    # deb822 sources first (URIs: line of a source whose Suites are Debian's, not -security), then one-line lists.
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        mirror="$(awk 'BEGIN{RS=""; FS="\n"} {u=""; s=""; for(i=1;i<=NF;i++){if($i ~ /^URIs:/){sub(/^URIs:[ \t]*/,"",$i); split($i,a," "); u=a[1]} if($i ~ /^Suites:/) s=$i} if(u!="" && s !~ /-security/ && u !~ /security/){print u; exit}}' "$f")"
        [ -n "$mirror" ] && break
    done
fi
if [ -z "$mirror" ]; then
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        mirror="$(awk '$1=="deb" && $0 !~ /security/ {for(i=2;i<=NF;i++) if($i ~ /^[a-z]+:\/\//){print $i; exit}}' "$f")"
        [ -n "$mirror" ] && break
    done
fi
[ -n "$mirror" ] || { echo "no Debian archive address in this machine's apt configuration: set DEBIAN_MIRROR or ORT_INCLUDE_DIR" >&2; exit 3; }

keyring=/usr/share/keyrings/debian-archive-keyring.gpg
work="$cache/apt"
rm -rf "$work"; mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/parts" "$work/deb"
signed=""
[ -f "$keyring" ] && signed="[signed-by=$keyring] "
echo "deb ${signed}${mirror%/} trixie main" > "$work/sources.list"
opts=(-o "Dir::Etc::SourceList=$work/sources.list" -o "Dir::Etc::SourceParts=$work/parts"
      -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o "Debug::NoLocking=1"
      -o "Dir::State::status=/dev/null" -o "APT::Get::List-Cleanup=0" -q=2)
[ "$(id -u)" = 0 ] && opts+=(-o "APT::Sandbox::User=root")
echo "fetching libonnxruntime-dev headers from trixie at $mirror into $cache" >&2
apt-get "${opts[@]}" update >&2 || { echo "apt-get update for trixie failed (offline?): set ORT_INCLUDE_DIR" >&2; exit 3; }
(cd "$work/deb" && apt-get "${opts[@]}" download libonnxruntime-dev >&2) || {
    echo "apt-get download libonnxruntime-dev failed: set ORT_INCLUDE_DIR" >&2; exit 3; }
rm -rf "$cache/root"; mkdir -p "$cache/root"
dpkg -x "$work/deb"/libonnxruntime-dev_*.deb "$cache/root"
find "$cache/root" -name 'libonnxruntime.so*' -type l -delete
rm -rf "$work/lists" "$work/cache"
check "$inc" || { echo "the .deb did not hold the expected headers under usr/include/onnxruntime" >&2; exit 3; }
echo "$inc"
