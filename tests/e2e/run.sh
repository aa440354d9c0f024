#!/usr/bin/env bash
# End-to-end suite on Docker (called by .ci/run): makes the Debian base image
# when missing (deploy/base-image.sh), builds the zonegate and HAProxy images,
# runs pytest on tests/e2e (the guide's single-container flow and the
# repository's docker-compose.yml: failover, failback, partition, down/up),
# then removes every container, network and volume the run created (names
# and compose projects starting with "zge2e"). Images are kept (build cache).
#
# No Docker engine reachable (or no compose tool): prints one SKIP line and
# exits 0. Otherwise the exit status is pytest's.
#
# Env: ZONEGATE_IMAGE (zonegate:dev), ZONEGATE_LB_IMAGE (zonegate-haproxy:dev),
#      COMPOSE ("docker compose" or "docker-compose"; detected), PYTEST_ARGS.
set -euo pipefail
cd "$(dirname "$0")/../.."
started=$(date +%s)
say() { printf 'e2e [%4ss] %s\n' "$(($(date +%s) - started))" "$*"; }

if ! command -v docker >/dev/null 2>&1; then
  echo "SKIP: tests/e2e: docker CLI not installed; end-to-end suite not run"; exit 0
fi
if ! timeout 30 docker info >/dev/null 2>&1; then
  echo "SKIP: tests/e2e: no Docker engine reachable (docker info failed); end-to-end suite not run"; exit 0
fi
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null 2>&1; then
  echo "SKIP: tests/e2e: neither 'docker compose' nor 'docker-compose' installed; end-to-end suite not run"; exit 0
fi

export ZONEGATE_IMAGE="${ZONEGATE_IMAGE:-zonegate:dev}"
export ZONEGATE_LB_IMAGE="${ZONEGATE_LB_IMAGE:-zonegate-haproxy:dev}"

volumes_before=" $(docker volume ls -q | tr '\n' ' ') "
cleanup() {
  local ids projects p v
  ids=$(docker ps -aq --filter name=zge2e 2>/dev/null || true)
  projects=$(docker ps -a --format '{{.Label "com.docker.compose.project"}}' 2>/dev/null | grep '^zge2e' | sort -u || true)
  for p in $projects; do
    ids="$ids $(docker ps -aq --filter "label=com.docker.compose.project=$p")"
  done
  # shellcheck disable=SC2086
  [ -z "${ids// /}" ] || docker rm -f -v $ids >/dev/null 2>&1 || true
  ids=$(docker network ls --format '{{.Name}}' | grep '^zge2e' || true)
  # shellcheck disable=SC2086
  [ -z "$ids" ] || docker network rm $ids >/dev/null 2>&1 || true
  ids=$(docker volume ls --format '{{.Name}}' | grep '^zge2e' || true)
  # shellcheck disable=SC2086
  [ -z "$ids" ] || docker volume rm -f $ids >/dev/null 2>&1 || true
  # Anonymous volumes that appeared during the run and are no longer used.
  for v in $(docker volume ls -q --filter dangling=true); do
    case "$volumes_before" in *" $v "*) ;; *) [ ${#v} -eq 64 ] && docker volume rm "$v" >/dev/null 2>&1 || true ;; esac
  done
}
trap cleanup EXIT

if ! docker image inspect debian:bookworm-slim >/dev/null 2>&1; then
  say "making debian:bookworm-slim (deploy/base-image.sh)"
  if [ "$(id -u)" -eq 0 ]; then bash deploy/base-image.sh; else sudo -n bash deploy/base-image.sh; fi
fi
say "building $ZONEGATE_IMAGE (deploy/Dockerfile)"
docker build -q -f deploy/Dockerfile -t "$ZONEGATE_IMAGE" . >/dev/null
say "building $ZONEGATE_LB_IMAGE (deploy/compose/haproxy.Dockerfile)"
docker build -q -f deploy/compose/haproxy.Dockerfile -t "$ZONEGATE_LB_IMAGE" deploy/compose >/dev/null

if ! python3 -c 'import openai, pytest' 2>/dev/null; then
  say "installing the Python test dependencies"
  python3 -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt
fi
say "pytest tests/e2e"
rc=0
# shellcheck disable=SC2086
python3 -m pytest -q -s -p no:cacheprovider tests/e2e ${PYTEST_ARGS:-} || rc=$?
say "done (pytest exit $rc)"
exit "$rc"
