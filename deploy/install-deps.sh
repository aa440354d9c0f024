#!/usr/bin/env bash
# Installs every build, test and runtime dependency of zonegate on Debian 12.
# Idempotent: running it twice changes nothing the second time.
# libraft >= 0.18.1 lives in bookworm-backports; we enable that suite by
# reusing the mirror URI already configured in this machine's apt sources,
# so no registry host name is written anywhere by this script.
# When every requested package is already installed (and libraft is new
# enough) it touches neither apt nor the network, so it also runs in images
# made with deploy/base-image.sh --deps on a build host without network.
# Fails (non-zero) when apt cannot reach the mirror or a package is missing.
#
# Usage: deploy/install-deps.sh [--runtime-only] [--no-test-tools] [--no-dev-tools]
#   --runtime-only   only the libraries the zonegate binary needs to run
#   --no-test-tools  skip haproxy, nginx, wrk, ... used by the cluster/e2e tests
#   --no-dev-tools   skip clang, clang-format and git (enough to build: used
#                    by deploy/Dockerfile)
set -euo pipefail

runtime_only=0
test_tools=1
dev_tools=1
for arg in "$@"; do
  case "$arg" in
    --runtime-only) runtime_only=1; test_tools=0 ;;
    --no-test-tools) test_tools=0 ;;
    --no-dev-tools) dev_tools=0 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "install-deps: unknown argument '$arg' (expected --runtime-only, --no-test-tools or --no-dev-tools)" >&2; exit 2 ;;
  esac
done

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive

# Find the Debian mirror URI this machine already uses (deb822 or one-line form).
find_mirror_uri() {
  local uri=""
  if ls /etc/apt/sources.list.d/*.sources >/dev/null 2>&1; then
    uri=$(awk '
      /^Types:/ {deb = ($0 ~ /deb/)}
      /^URIs:/ {u=$2}
      /^Suites:/ && $0 ~ /bookworm( |$)/ && u !~ /security/ {print u; exit}
    ' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  fi
  if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
    uri=$(awk '$1=="deb" && $3=="bookworm" {print $2; exit}' /etc/apt/sources.list || true)
  fi
  echo "$uri"
}

enable_backports() {
  if grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null; then
    return 0
  fi
  local uri
  uri=$(find_mirror_uri)
  if [ -z "$uri" ]; then
    echo "install-deps: cannot find the bookworm mirror in /etc/apt/sources*; add bookworm-backports by hand" >&2
    exit 1
  fi
  echo "install-deps: enabling bookworm-backports from the configured mirror"
  printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$uri" |
    $SUDO tee /etc/apt/sources.list.d/zonegate-backports.sources >/dev/null
}

RUNTIME_PKGS=(libuv1 libcurl4 libcjson1 libssl3 libhttp-parser2.9 ca-certificates curl)
BUILD_PKGS=(build-essential cmake pkg-config libuv1-dev libcurl4-openssl-dev libcjson-dev
  libssl-dev libhttp-parser-dev libcmocka-dev zlib1g-dev)
DEV_PKGS=(clang clang-format libclang-rt-14-dev git)
TEST_PKGS=(haproxy nginx-light wrk python3 python3-venv iproute2 nftables procps jq debootstrap swaks tcpdump)

pkgs=("${RUNTIME_PKGS[@]}")
raft_pkgs=(libraft0)
if [ "$runtime_only" -eq 0 ]; then
  pkgs+=("${BUILD_PKGS[@]}")
  raft_pkgs+=(libraft-dev)
  if [ "$dev_tools" -eq 1 ]; then pkgs+=("${DEV_PKGS[@]}"); fi
fi
if [ "$test_tools" -eq 1 ]; then pkgs+=("${TEST_PKGS[@]}"); fi

# Everything already there (libraft >= 0.18.1 included)? Then nothing to do.
all_installed() {
  local p status v
  for p in "${pkgs[@]}" "${raft_pkgs[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
    [ "$status" = "installed" ] || return 1
  done
  v=$(dpkg-query -W -f='${Version}' libraft0 2>/dev/null || true)
  dpkg --compare-versions "${v:-0}" ge 0.18.1
}
if all_installed; then
  echo "install-deps: all ${#pkgs[@]} packages and libraft $(dpkg-query -W -f='${Version}' libraft0) already installed; nothing to do"
  exit 0
fi

enable_backports
$SUDO apt-get update -qq -o Acquire::Retries=3

$SUDO apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
# libraft from backports (0.22.x); bookworm main has 0.15.0 which the build refuses.
$SUDO apt-get install -y -qq --no-install-recommends -t bookworm-backports "${raft_pkgs[@]}" >/dev/null
echo "install-deps: libraft $(dpkg-query -W -f='${Version}' libraft0 2>/dev/null || echo '?') installed"
