#!/bin/sh
# Writes .env at the repository root with fresh random secrets for
# docker-compose.yml (mode 0600). Refuses to overwrite an existing .env
# (that would orphan the sealed keys of a running cluster) unless --force.
# Needs openssl or /dev/urandom + base64. Prints no secret.
#
# Usage: sh deploy/compose/make-env.sh [--force] [--upstream URL]
#        (the upstream key is read from $UPSTREAM_API_KEY when set)
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
env_file="$root/.env"
force=0
upstream=""
while [ $# -gt 0 ]; do
  case "$1" in
    --force) force=1 ;;
    --upstream) upstream="${2:?--upstream needs a URL}"; shift ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "make-env: unknown argument '$1' (expected --force, --upstream URL)" >&2; exit 2 ;;
  esac
  shift
done
if [ -e "$env_file" ] && [ "$force" -eq 0 ]; then
  echo "make-env: $env_file exists; keeping it (use --force to replace; the master key seals stored provider keys)"
  exit 0
fi
rand_b64() { # N bytes of randomness, base64
  if command -v openssl >/dev/null 2>&1; then openssl rand -base64 "$1"
  else head -c "$1" /dev/urandom | base64 | tr -d '\n'; echo; fi
}
rand_token() { rand_b64 24 | tr '+/' '-_' | tr -d '=\n'; }
umask 077
tmp="$env_file.tmp.$$"
{
  echo "# Made by deploy/compose/make-env.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ). Keep private; never commit."
  echo "ZONEGATE_CLUSTER_SECRET=$(rand_token)"
  echo "ZONEGATE_MASTER_KEY=$(rand_b64 32)"
  echo "ZONEGATE_ADMIN_TOKEN=$(rand_token)"
  echo "UPSTREAM_API_KEY=${UPSTREAM_API_KEY:-mock-$(rand_token)}"
  if [ -n "$upstream" ]; then echo "UPSTREAM_ENDPOINT=$upstream"; fi
} >"$tmp"
mv "$tmp" "$env_file"
echo "make-env: wrote $env_file (mode 0600): cluster secret, master key, admin token, upstream key${upstream:+, endpoint $upstream}"
