# HAProxy for the e2e cluster, built from the same Debian base as zonegate
# (no registry needed; see deploy/base-image.sh). Where a registry is
# reachable, the official haproxy image works the same with deploy/haproxy.cfg.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends haproxy >/dev/null \
 && rm -rf /var/lib/apt/lists/*
EXPOSE 18789
STOPSIGNAL SIGUSR1
CMD ["haproxy", "-db", "-f", "/etc/haproxy/haproxy.cfg"]
