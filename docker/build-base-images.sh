#!/usr/bin/env bash
# Local stand-ins for the base images the project's images start from, for machines that cannot pull from an image
# registry: python:3.11-slim (Dockerfile) and postgres:15 (docker-compose.yml). Each is made from Debian bookworm's
# own packages (debootstrap --variant=minbase, then `docker import`) under the upstream name, so the Dockerfile and
# the compose file stay exactly what users run against the real images. An image already present under that name
# (pulled or built earlier) is left alone, so a second run takes a second.
#
#  python:3.11-slim  Debian's python3 (3.11) + pip; `python`/`pip` on PATH and pip allowed to install system-wide,
#                    as in the upstream image. The machine's CA bundle replaces Debian's, and PIP_CERT points at it, so
#                    `pip install` inside `docker build --network host` trusts what this machine trusts (a TLS-inspecting
#                    proxy in front of the package index); the Dockerfile itself needs no build argument for that.
#  postgres:15       Debian's postgresql-15 with stand-ins/postgres-entrypoint.sh: the parts of the upstream image's
#                    entrypoint the stack uses (POSTGRES_PASSWORD/USER/DB, PGDATA, /docker-entrypoint-initdb.d).
#
# The Debian mirror is the one this machine's apt uses (/etc/apt/sources.list.d/, /etc/apt/sources.list), read at
# run time. Needs root (debootstrap) and a running engine (ensure-docker.sh starts one).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
log() { echo "build-base-images: $*" >&2; }
SUITE=bookworm

mirror() {
  local m
  m=$(grep -hs -E '^\s*URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v -- -security | head -n1 || true)
  [ -n "$m" ] || m=$(grep -hs -E '^\s*deb\s' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
                     | sed -E 's/\[[^]]*\]//' | awk '{print $2}' | grep -v -- -security | head -n1 || true)
  [ -n "$m" ] || { log "no Debian mirror found in /etc/apt/sources.list*; cannot build stand-in images"; exit 1; }
  echo "$m"
}

have() { docker image inspect "$1" >/dev/null 2>&1; }

bootstrap() {   # bootstrap ROOTFS PACKAGES
  log "debootstrap $SUITE with $2 (about 1.5 minutes)"
  debootstrap --variant=minbase --include="$2" "$SUITE" "$1" "$(mirror)" >"$1.log" 2>&1 \
    || { tail -n 30 "$1.log" >&2; exit 1; }
  rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*
}

work=$(mktemp -d /var/tmp/drcaps-base.XXXXXX)
trap 'rm -rf "$work"' EXIT
PATH_ENV='ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'

if ! have python:3.11-slim; then
  r="$work/python"
  bootstrap "$r" python3,python3-pip,python3-venv,ca-certificates
  ln -sf /usr/bin/python3 "$r/usr/local/bin/python"
  rm -f "$r"/usr/lib/python3*/EXTERNALLY-MANAGED
  if [ -f /etc/ssl/certs/ca-certificates.crt ]; then cp /etc/ssl/certs/ca-certificates.crt "$r/etc/ssl/certs/"; fi
  tar -C "$r" -c . | docker import \
    --change "$PATH_ENV" --change 'ENV LANG=C.UTF-8' --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'LABEL org.drcaps.stand-in=debian-bookworm' --change 'CMD ["python3"]' - python:3.11-slim >/dev/null
  log "built python:3.11-slim (stand-in)"
fi

if ! have postgres:15; then
  r="$work/postgres"
  bootstrap "$r" postgresql-15,postgresql-client-15
  rm -rf "$r"/var/lib/postgresql/15 "$r"/etc/postgresql/15/main     # the cluster Debian made; PGDATA is used instead
  install -m 0755 "$here/stand-ins/postgres-entrypoint.sh" "$r/usr/local/bin/docker-entrypoint.sh"
  mkdir -p "$r/docker-entrypoint-initdb.d"
  tar -C "$r" -c . | docker import \
    --change "ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change 'ENV LANG=C.UTF-8' --change 'ENV PGDATA=/var/lib/postgresql/data' \
    --change 'LABEL org.drcaps.stand-in=debian-bookworm' --change 'EXPOSE 5432' \
    --change 'ENTRYPOINT ["docker-entrypoint.sh"]' --change 'CMD ["postgres"]' - postgres:15 >/dev/null
  log "built postgres:15 (stand-in)"
fi
