#!/usr/bin/env bash
# Failover drills against the docker compose deployment (docker-compose.yml).
#
#   deploy/drill.sh crash-zone A|B|C      the zone's container is killed (SIGKILL), started again
#                                         after --fault-duration
#   deploy/drill.sh partition-zone A|B|C  the zone's container is disconnected from its inter-zone
#                                         links (Raft + admin); it keeps the LB's network, so the
#                                         LB can still reach it (the fencing case); reconnected
#                                         after --fault-duration
#   deploy/drill.sh pause-zone A|B|C      the zone's container is frozen (docker pause), unpaused
#                                         after --fault-duration
#   deploy/drill.sh zonegate switchover|crash|freeze|isolate [ARGS]
#                                         `zonegate drill KIND` through the drill endpoints
#                                         (drills.enabled, set in deploy/compose/*.json)
#
# Options (zone drills): --duration S (20), --fault-duration S (5), --inject-at S (2), --json.
#
# Every drill runs `zonegate drill` from the image in a one-shot container on
# the LB's and the links' networks (compose service `drill`): probes through
# the LB (http://lb:18789), the timeline and the report are the same as for
# `zonegate drill`. For the zone drills it runs `zonegate drill external`,
# whose --inject command only touches a marker file in a directory shared
# with this script; this script sees the marker (polled every 10 ms) and
# applies the fault with the Docker CLI, then heals it. Lines from this
# script go to stderr with times since the marker was seen, so `--json`
# output on stdout stays clean.
#
# Run from anywhere; the compose project is the repository root's (honours
# COMPOSE_PROJECT_NAME and .env). COMPOSE="docker-compose" or "docker compose"
# overrides the tool detection. Exit status: that of `zonegate drill`
# (0 ok), 2 usage, 1 when the cluster or the target is not there.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

usage() { sed -n '2,32p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "drill.sh: $*" >&2; exit 1; }

if [ -z "${COMPOSE:-}" ]; then
  if docker compose version >/dev/null 2>&1; then COMPOSE="docker compose"
  elif command -v docker-compose >/dev/null 2>&1; then COMPOSE="docker-compose"
  else die "neither 'docker compose' nor 'docker-compose' is available"; fi
fi
compose() { $COMPOSE "$@"; }

[ $# -ge 2 ] || usage
action="$1"; shift

# Runs `zonegate ARGS` in the one-shot drill container; extra docker-compose
# run options come first, separated by --.
run_zonegate() {
  local opts=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do opts+=("$1"); shift; done
  shift
  compose run --rm -T "${opts[@]}" drill "$@"
}

if [ "$action" = "zonegate" ]; then
  kind="$1"; shift
  case "$kind" in switchover|crash|freeze|isolate) ;; *) usage ;; esac
  run_zonegate -- drill "$kind" --lb http://lb:18789 --addr witness.private:18790 "$@"
  exit $?
fi

zone="$1"; shift
case "$action" in crash-zone|partition-zone|pause-zone) ;; *) usage ;; esac
case "$zone" in
  A|a) service=gw-a; links=(zone-a-b zone-a-c); admin=gw-b.private:18790 ;;
  B|b) service=gw-b; links=(zone-a-b zone-b-c); admin=gw-a.private:18790 ;;
  C|c) service=witness; links=(zone-a-c zone-b-c); admin=gw-a.private:18790 ;;
  *) usage ;;
esac

duration=20 fault_duration=5 inject_at=2 json=()
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) duration="${2:?}"; shift ;;
    --fault-duration) fault_duration="${2:?}"; shift ;;
    --inject-at) inject_at="${2:?}"; shift ;;
    --json) json=(--json) ;;
    *) usage ;;
  esac
  shift
done

cid=$(compose ps -q "$service" 2>/dev/null || true)
[ -n "$cid" ] || die "no container for service $service (is the compose project up? $COMPOSE ps)"
[ "$(docker inspect -f '{{.State.Running}}' "$cid")" = "true" ] || die "$service is not running"
project=$(docker inspect -f '{{index .Config.Labels "com.docker.compose.project"}}' "$cid")
link_ids=()
for link in "${links[@]}"; do
  id=$(docker network ls -q --filter "label=com.docker.compose.project=$project" \
    --filter "label=com.docker.compose.network=$link")
  [ -n "$id" ] || die "network $link of project $project not found"
  link_ids+=("$id")
done

handshake=$(mktemp -d /tmp/zonegate-drill.XXXXXX)
chmod 0777 "$handshake"
watcher=""
cleanup() {
  [ -n "$watcher" ] && kill "$watcher" 2>/dev/null || true
  rm -rf "$handshake"
}
trap cleanup EXIT

started_ns=0
note() { printf 'drill.sh: +%6d ms  %s\n' $((($(date +%s%N) - started_ns) / 1000000)) "$*" >&2; }

apply_fault() {
  case "$action" in
    crash-zone) docker kill "$cid" >/dev/null && note "fault: docker kill $service" ;;
    pause-zone) docker pause "$cid" >/dev/null && note "fault: docker pause $service" ;;
    partition-zone)
      for i in "${!link_ids[@]}"; do docker network disconnect "${link_ids[$i]}" "$cid"; done
      note "fault: $service disconnected from ${links[*]} (keeps front)" ;;
  esac
}

heal_fault() {
  case "$action" in
    crash-zone)
      # The restart policy may already have restarted it.
      if [ "$(docker inspect -f '{{.State.Running}}' "$cid")" != "true" ]; then docker start "$cid" >/dev/null; fi
      note "healed: $service running again" ;;
    pause-zone) docker unpause "$cid" >/dev/null && note "healed: docker unpause $service" ;;
    partition-zone)
      for i in "${!link_ids[@]}"; do
        docker network connect --alias "$service" --alias "$service.private" "${link_ids[$i]}" "$cid"
      done
      note "healed: $service reconnected to ${links[*]}" ;;
  esac
}

# Waits (bounded) for the marker, applies the fault, heals it later.
watch_and_inject() {
  local limit=$(((inject_at + duration + 30) * 100)) n=0
  while [ ! -e "$handshake/fault" ]; do
    n=$((n + 1))
    [ "$n" -lt "$limit" ] || return 0
    sleep 0.01
  done
  started_ns=$(date +%s%N)
  apply_fault
  sleep "$fault_duration"
  heal_fault
}
watch_and_inject &
watcher=$!

rc=0
run_zonegate -v "$handshake:/drill" -- drill external --lb http://lb:18789 --addr "$admin" \
  --duration "$duration" --inject-at "$inject_at" --inject "touch /drill/fault" "${json[@]}" || rc=$?
# The heal may still be pending when the probes end before --fault-duration;
# with no marker the drill stopped before the fault: nothing to heal.
if [ -e "$handshake/fault" ]; then wait "$watcher" 2>/dev/null || true
else kill "$watcher" 2>/dev/null || true; fi
watcher=""
exit "$rc"
