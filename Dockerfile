# akm-worker: runs the task files of a stash on schedule (supercronic under
# `akm scheduler`) and records every run in the stash's state.db.
#
#   docker compose build                      # or: docker build -t akm-worker .
#
# Build inputs that work with no internet beyond Debian's mirror and PyPI
# (see offline/README.md): offline/supercronic_<version>_<arch>.deb or
# offline/supercronic-linux-<arch>, and offline/ca.crt, an extra CA that pip
# trusts during the build only (never copied into the image).
#
# Never build with --pull where no registry answers: the base is local.
ARG BASE_IMAGE=debian:trixie-slim

# --- supercronic: pinned and verified, from one of three sources -------------
FROM ${BASE_IMAGE} AS supercronic
ARG TARGETARCH
# auto: offline/ input if present, else Debian's package; or debian | upstream
ARG SUPERCRONIC_SOURCE=auto
# Debian's package (sid/forky), pinned by version and sha256 of the .deb.
ARG SUPERCRONIC_DEB_VERSION=0.2.45-1
ARG SUPERCRONIC_DEB_SHA256=
ARG DEBIAN_POOL=http://deb.debian.org/debian
# Upstream's release binary, pinned by version and its published SHA1SUM.
ARG SUPERCRONIC_VERSION=v0.2.33
ARG SUPERCRONIC_SHA1SUM=
COPY offline/ /offline/
RUN set -eu; \
    arch=${TARGETARCH:-$(dpkg --print-architecture)}; \
    # sha256 of Debian's supercronic_0.2.45-1_amd64.deb; other arches pass SUPERCRONIC_DEB_SHA256
    deb_sha=${SUPERCRONIC_DEB_SHA256:-$( [ "$arch.$SUPERCRONIC_DEB_VERSION" = amd64.0.2.45-1 ] && echo a40026d0242aaf8b63b8c35e4e2ca1eea59b2836f58e2f64f6f3c0bff1d40128 || true)}; \
    # upstream's published SHA1SUMs for v0.2.33
    bin_sha=${SUPERCRONIC_SHA1SUM:-$(case "$arch.$SUPERCRONIC_VERSION" in \
        amd64.v0.2.33) echo 71b0d58cc53f6bd72cf2f293e09e294b79c666d8;; \
        arm64.v0.2.33) echo e0f0c06ebc5627e43b25475711e694450489ab00;; esac)}; \
    deb=/offline/supercronic_${SUPERCRONIC_DEB_VERSION}_${arch}.deb; \
    bin=/offline/supercronic-linux-${arch}; \
    src=$SUPERCRONIC_SOURCE; \
    if [ "$src" = auto ]; then \
        if [ -f "$deb" ]; then src=offline-deb; \
        elif [ -f "$bin" ]; then src=offline-binary; \
        else src=debian; fi; \
    fi; \
    fetch() { \
        apt-get update -q >/dev/null && apt-get install -q -y --no-install-recommends curl ca-certificates >/dev/null; \
        curl -fsSL --retry 3 -o "$2" "$1"; \
    }; \
    mkdir -p /out; \
    case "$src" in \
    debian|offline-deb) \
        [ -n "$deb_sha" ] || { echo "no sha256 pinned for supercronic $SUPERCRONIC_DEB_VERSION on $arch: pass --build-arg SUPERCRONIC_DEB_SHA256=..." >&2; exit 1; }; \
        if [ "$src" = debian ]; then \
            deb=/tmp/supercronic.deb; \
            fetch "$DEBIAN_POOL/pool/main/s/supercronic/supercronic_${SUPERCRONIC_DEB_VERSION}_${arch}.deb" "$deb"; \
        fi; \
        echo "$deb_sha  $deb" | sha256sum -c - >/dev/null \
            || { echo "$deb: sha256 does not match the pinned $deb_sha" >&2; exit 1; }; \
        dpkg-deb -x "$deb" /tmp/x; cp /tmp/x/usr/bin/supercronic /out/supercronic; \
        echo "$SUPERCRONIC_DEB_VERSION (Debian package supercronic_${SUPERCRONIC_DEB_VERSION}_${arch}.deb, sha256 $deb_sha)" > /out/version;; \
    upstream|offline-binary) \
        [ -n "$bin_sha" ] || { echo "no SHA1SUM pinned for supercronic $SUPERCRONIC_VERSION on $arch: pass --build-arg SUPERCRONIC_SHA1SUM=..." >&2; exit 1; }; \
        if [ "$src" = upstream ]; then \
            bin=/tmp/supercronic-linux-$arch; \
            fetch "https://github.com/aptible/supercronic/releases/download/$SUPERCRONIC_VERSION/supercronic-linux-$arch" "$bin"; \
        fi; \
        echo "$bin_sha  $bin" | sha1sum -c - >/dev/null \
            || { echo "$bin: SHA1 does not match the pinned $bin_sha" >&2; exit 1; }; \
        cp "$bin" /out/supercronic; \
        echo "$SUPERCRONIC_VERSION (upstream release binary supercronic-linux-$arch, sha1 $bin_sha)" > /out/version;; \
    *) echo "SUPERCRONIC_SOURCE=$src: use auto, debian or upstream" >&2; exit 1;; \
    esac; \
    chmod 0755 /out/supercronic; \
    echo "supercronic from $src: $(cat /out/version)"

# --- the Python package in a venv (pip and build caches stay here) ---------------
FROM ${BASE_IMAGE} AS venv
ARG PIP_INDEX_URL=
RUN apt-get update -q && apt-get install -q -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
COPY offline/ /offline/
COPY pyproject.toml README* /src/
COPY worker/ /src/worker/
RUN set -eu; \
    # an extra CA for builds behind a TLS-inspecting proxy; this stage only
    if [ -s /offline/ca.crt ]; then export PIP_CERT=/offline/ca.crt; fi; \
    if [ -n "$PIP_INDEX_URL" ]; then export PIP_INDEX_URL; else unset PIP_INDEX_URL; fi; \
    [ -f /src/README.md ] || : > /src/README.md; \
    python3 -m venv /opt/akm/venv; \
    /opt/akm/venv/bin/pip install -q --no-cache-dir --disable-pip-version-check --no-warn-script-location /src; \
    /opt/akm/venv/bin/pip uninstall -q -y pip; \
    /opt/akm/venv/bin/akm --help >/dev/null

# --- the image ----------------------------------------------------------------------
FROM ${BASE_IMAGE}
# Extra Debian packages your tasks need, e.g. git for the stash's `git pull` recipe
# (--build-arg EXTRA_PACKAGES="git openssh-client jq"; compose passes $EXTRA_PACKAGES).
ARG EXTRA_PACKAGES=
RUN apt-get update -q \
    && apt-get install -q -y --no-install-recommends python3 tzdata ca-certificates util-linux $EXTRA_PACKAGES \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log \
    && groupadd -g 1000 akm && useradd -u 1000 -g 1000 -d /home/akm -m -s /bin/sh akm
COPY --from=supercronic /out/supercronic /usr/bin/supercronic
COPY --from=supercronic /out/version /usr/share/akm-worker/supercronic.version
COPY --from=venv /opt/akm/venv /opt/akm/venv
COPY entrypoint /usr/local/bin/akm-entrypoint
RUN ln -s akm-entrypoint /usr/local/bin/akm && mkdir -p /stash && chown 1000:1000 /stash

# PUID/PGID: the uid/gid the worker runs as (the owner of the stash on the host).
# TZ: the time zone the schedules follow. AKM_STOP_TIMEOUT: how long `docker stop`
# lets tasks finish after SIGTERM (keep stop_grace_period above it).
# AKM_KILL_GRACE: SIGTERM -> SIGKILL for a task's group; 5 s so that even a
# plain `docker stop` (10 s) records a stubborn task as `interrupted`.
ENV PATH=/usr/local/bin:/opt/akm/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    AKM_STASH=/stash \
    AKM_RUN_DIR=/tmp/akm \
    AKM_CRONTAB=/tmp/akm/crontab \
    PUID=1000 PGID=1000 TZ=UTC \
    AKM_STOP_TIMEOUT=20 \
    AKM_KILL_GRACE=5 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /stash
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 CMD ["akm", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/akm-entrypoint"]
CMD ["akm", "scheduler"]
