#!/usr/bin/env bash
# Makes the local Docker base images zonegate builds FROM, for machines whose
# Docker engine cannot pull from a registry.
#
#   debian:bookworm-slim          used as is when present; else pulled (short
#                                 timeout); else built with debootstrap
#                                 (--variant=minbase) from this machine's Debian
#                                 mirror and loaded with `docker import`.
#   zonegate-builddeps:bookworm   (--deps) the base plus every build dependency
#   zonegate-runtime:bookworm     (--deps) the base plus the runtime libraries
#                                 Both are made by running deploy/install-deps.sh
#                                 in a chroot on the host, so they work even when
#                                 containers cannot reach the mirror during
#                                 `docker build`. Select them with
#                                 --build-arg BUILD_BASE=... / RUNTIME_BASE=...
#
# The mirror URI is read at run time from /etc/apt/sources.list.d/*.sources or
# /etc/apt/sources.list; no host name is written in this file. The images' own
# apt sources use the same URI (the deps images also have bookworm-backports,
# enabled by install-deps.sh). Idempotent: an image that exists is kept unless
# --force. Needs root (debootstrap, chroot, mount) and a running Docker engine.
# Fails (non-zero, with the step that failed) when a step fails; temporary
# directories and mounts are removed on every exit.
#
# Usage: deploy/base-image.sh [--deps] [--force] [--pull-timeout SECONDS]
set -euo pipefail

BASE_TAG="debian:bookworm-slim"
BUILDDEPS_TAG="zonegate-builddeps:bookworm"
RUNTIME_TAG="zonegate-runtime:bookworm"
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

make_deps=0
force=0
pull_timeout=30
while [ $# -gt 0 ]; do
  case "$1" in
    --deps) make_deps=1 ;;
    --force) force=1 ;;
    --pull-timeout) pull_timeout="${2:?--pull-timeout needs a number of seconds}"; shift ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "base-image: unknown argument '$1' (expected --deps, --force, --pull-timeout N)" >&2; exit 2 ;;
  esac
  shift
done

started=$(date +%s)
say() { printf 'base-image [%4ss] %s\n' "$(($(date +%s) - started))" "$*"; }
die() { printf 'base-image: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap, chroot and mount need it)"
command -v docker >/dev/null || die "docker CLI not found"
docker info >/dev/null 2>&1 || die "cannot talk to the Docker engine (is it running? are you in the docker group?)"

# --- mirror URIs from this machine's apt configuration -----------------------
# Prints the first URI whose suites include SUITE (deb822 first, then one-line).
mirror_uri_for_suite() {
  local suite="$1" uri=""
  if ls /etc/apt/sources.list.d/*.sources >/dev/null 2>&1; then
    uri=$(awk -v want="$suite" '
      /^[[:space:]]*$/ {u = ""}
      /^URIs:/ {u = $2}
      /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == want && u != "") { print u; exit } }
    ' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  fi
  if [ -z "$uri" ]; then
    uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | sed -E 's/\[[^]]*\]//' |
      awk -v want="$suite" '$1 == "deb" && $3 == want { print $2; exit }' || true)
  fi
  printf '%s' "$uri"
}

MIRROR=$(mirror_uri_for_suite bookworm)
SECURITY_MIRROR=$(mirror_uri_for_suite bookworm-security)

# --- temporary state, always cleaned up --------------------------------------
WORK=""
MOUNTS=()
cleanup() {
  local i
  for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do umount -l "${MOUNTS[$i]}" 2>/dev/null || true; done
  MOUNTS=()
  if [ -n "$WORK" ] && [ -d "$WORK" ]; then rm -rf --one-file-system "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

# Writes the apt and dpkg configuration of a slim image into ROOT.
configure_rootfs() {
  local root="$1"
  # Same apt sources as this machine (deb822), nothing else.
  rm -f "$root/etc/apt/sources.list"
  {
    printf 'Types: deb\nURIs: %s\nSuites: bookworm bookworm-updates\nComponents: main\n' "$MIRROR"
    printf 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n'
    if [ -n "$SECURITY_MIRROR" ]; then
      printf '\nTypes: deb\nURIs: %s\nSuites: bookworm-security\nComponents: main\n' "$SECURITY_MIRROR"
      printf 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n'
    fi
  } >"$root/etc/apt/sources.list.d/debian.sources"
  # Keep documentation, manuals and translations out of the image.
  mkdir -p "$root/etc/dpkg/dpkg.cfg.d"
  cat >"$root/etc/dpkg/dpkg.cfg.d/zonegate-slim" <<'EOF'
# Slim image: no docs (except copyright), manuals or translations.
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
  cat >"$root/etc/apt/apt.conf.d/zonegate-slim" <<'EOF'
// Slim image: no recommends, no binary package caches kept on disk.
APT::Install-Recommends "false";
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
}

# Removes what a slim image does not need: caches, lists, logs, docs.
slim_rootfs() {
  local root="$1"
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
    "$root"/var/cache/apt/archives/partial/* "$root"/var/cache/debconf/*-old "$root"/var/lib/dpkg/*-old \
    "$root"/var/log/*.log "$root"/var/log/apt/* "$root"/tmp/* "$root"/var/tmp/* "$root"/root/.cache
  find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
  find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
  find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} + 2>/dev/null || true
  rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/groff/* "$root"/usr/share/lintian/*
  : >"$root/etc/resolv.conf" 2>/dev/null || true
  rm -f "$root/etc/hostname"
}

# Loads ROOT into Docker as TAG.
import_rootfs() {
  local root="$1" tag="$2" origin="$3"
  say "importing $(du -sh --apparent-size "$root" | cut -f1) root filesystem as $tag"
  tar --numeric-owner --xattrs -C "$root" -c . |
    docker import \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV LANG=C.UTF-8' \
      --change 'CMD ["bash"]' \
      --change "LABEL org.zonegate.base-image.origin=\"$origin\"" \
      --message "zonegate deploy/base-image.sh: $origin" - "$tag" >/dev/null
  say "$tag ready ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}'))"
}

# Runs a command inside ROOT with /proc, /sys, /dev and host DNS available.
chroot_run() {
  local root="$1"; shift
  local m
  for m in proc sys dev dev/pts; do
    mkdir -p "$root/$m"
    case "$m" in
      proc) mount -t proc proc "$root/proc" ;;
      sys) mount --rbind /sys "$root/sys" ;;
      dev) mount --rbind /dev "$root/dev" ;;
      dev/pts) continue ;;
    esac
    MOUNTS+=("$root/$m")
  done
  cp -L /etc/resolv.conf "$root/etc/resolv.conf"
  local rc=0
  chroot "$root" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    DEBIAN_FRONTEND=noninteractive HOME=/root "$@" || rc=$?
  local i
  for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do umount -l "${MOUNTS[$i]}" 2>/dev/null || true; done
  MOUNTS=()
  return "$rc"
}

# --- 1. debian:bookworm-slim -------------------------------------------------
make_base() {
  if [ "$force" -eq 0 ] && image_exists "$BASE_TAG"; then
    say "$BASE_TAG already present ($(docker image inspect -f '{{index .Config.Labels "org.zonegate.base-image.origin"}}' "$BASE_TAG" 2>/dev/null || true)); keeping it"
    return 0
  fi
  if [ "$force" -eq 0 ]; then
    say "trying docker pull $BASE_TAG (timeout ${pull_timeout}s)"
    if timeout "$pull_timeout" docker pull -q "$BASE_TAG" >/dev/null 2>&1; then
      say "pulled $BASE_TAG from the registry"
      return 0
    fi
    say "pull failed or timed out; building $BASE_TAG with debootstrap"
  fi
  command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install debootstrap)"
  [ -n "$MIRROR" ] || die "no bookworm mirror found in /etc/apt/sources.list* (needed for debootstrap)"
  [ -f /usr/share/keyrings/debian-archive-keyring.gpg ] || die "missing /usr/share/keyrings/debian-archive-keyring.gpg (apt-get install debian-archive-keyring)"

  WORK=$(mktemp -d /var/tmp/zonegate-base.XXXXXX)
  local root="$WORK/rootfs"
  say "debootstrap --variant=minbase bookworm from the configured mirror into $root"
  if ! debootstrap --variant=minbase --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
    bookworm "$root" "$MIRROR" >"$WORK/debootstrap.log" 2>&1; then
    tail -n 20 "$WORK/debootstrap.log" >&2
    die "debootstrap failed (log above)"
  fi
  say "debootstrap done; configuring apt sources and slimming"
  configure_rootfs "$root"
  slim_rootfs "$root"
  import_rootfs "$root" "$BASE_TAG" "debootstrap minbase bookworm $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  rm -rf --one-file-system "$WORK"; WORK=""
}

# --- 2. deps images (chroot install, no container network needed) ------------
# Exports BASE_TAG to a directory, runs install-deps.sh ARGS in it, imports TAG.
make_deps_image() {
  local tag="$1"; shift
  if [ "$force" -eq 0 ] && image_exists "$tag"; then
    say "$tag already present; keeping it"
    return 0
  fi
  WORK=$(mktemp -d /var/tmp/zonegate-deps.XXXXXX)
  local root="$WORK/rootfs" cid
  mkdir -p "$root"
  say "exporting $BASE_TAG for $tag"
  cid=$(docker create "$BASE_TAG" true)
  docker export "$cid" | tar --numeric-owner -C "$root" -x
  docker rm "$cid" >/dev/null
  configure_rootfs "$root"
  install -m 0755 "$SCRIPT_DIR/install-deps.sh" "$root/tmp/install-deps.sh"
  say "chroot: install-deps.sh $*"
  chroot_run "$root" bash /tmp/install-deps.sh "$@" || die "install-deps.sh $* failed inside the chroot for $tag"
  slim_rootfs "$root"
  import_rootfs "$root" "$tag" "$BASE_TAG + install-deps.sh $* $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  rm -rf --one-file-system "$WORK"; WORK=""
}

make_base
if [ "$make_deps" -eq 1 ]; then
  make_deps_image "$BUILDDEPS_TAG" --no-test-tools --no-dev-tools
  make_deps_image "$RUNTIME_TAG" --runtime-only
fi
say "done"
