#!/usr/bin/env bash
# Make a Docker engine usable for the cluster tests (tests/cluster/): install the Debian packages when missing,
# start dockerd when it is not running, then build the local stand-ins of the base images (build-base-images.sh).
# Idempotent and quick (a second or two) when everything is already there. Needs root for the install and for
# starting dockerd; without root and without a running engine it says so and exits 0: the cluster tests then skip
# with that reason. `make test` runs it before pytest.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
log() { echo "ensure-docker: $*" >&2; }

root=0; [ "$(id -u)" = 0 ] && root=1

missing=()
command -v docker >/dev/null || missing+=(docker.io)
command -v dockerd >/dev/null || missing+=(docker.io)
{ docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null; } || missing+=(docker-compose)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  if [ $root = 1 ] && command -v apt-get >/dev/null; then
    log "installing ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    log "missing ${missing[*]} and cannot install them (not root or no apt-get); the cluster tests will skip"
    exit 0
  fi
fi

if ! docker info >/dev/null 2>&1; then
  if [ $root = 0 ]; then
    log "no Docker engine answers and only root can start dockerd here; the cluster tests will skip"
    exit 0
  fi
  log "starting dockerd (log: /var/log/dockerd-drcaps.log)"
  mkdir -p /var/log
  # setsid + nohup: the engine outlives this script and the make that ran it (later runs find it up).
  setsid nohup dockerd >/var/log/dockerd-drcaps.log 2>&1 < /dev/null &
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  docker info >/dev/null 2>&1 || { log "dockerd did not answer within 60 s; see /var/log/dockerd-drcaps.log"; exit 1; }
fi

"$here/build-base-images.sh"
