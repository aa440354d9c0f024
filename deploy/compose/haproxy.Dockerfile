# HAProxy from Debian, built on the same base as zonegate (no registry needed;
# see deploy/base-image.sh). Used by docker-compose.yml for the load balancer
# (with deploy/haproxy.cfg) and for the opt-in `ops` port forwarder (with
# deploy/compose/ops-haproxy.cfg). Where a registry is reachable the official
# haproxy image works the same with those files.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends haproxy >/dev/null \
 && rm -rf /var/lib/apt/lists/*
EXPOSE 18789
# SIGUSR1: soft stop (finish open connections, then exit).
STOPSIGNAL SIGUSR1
CMD ["haproxy", "-db", "-f", "/etc/haproxy/haproxy.cfg"]
