#!/usr/bin/env bash
# Sourced by the container scripts: podman settings that work on hosts without a Docker engine
# (see shared/CONTAINER.md): runc (crun fails on hybrid cgroups), small explicit ulimits
# (raising them is not permitted), storage under the cache dir so nothing leaks into /var/lib.
# Needs: REPO (repo root). Exports: CACHE, CONTAINERS_CONF, CONTAINERS_STORAGE_CONF.

CACHE="${CONTAINER_CACHE_DIR:-$REPO/.container}"
mkdir -p "$CACHE/conf" "$CACHE/storage" "$CACHE/run" "$CACHE/tmp"
CACHE="$(cd "$CACHE" && pwd)"

cat > "$CACHE/conf/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
runtime = "runc"
CONF
cat > "$CACHE/conf/storage.conf" <<CONF
[storage]
driver = "overlay"
graphroot = "$CACHE/storage"
runroot = "$CACHE/run"
CONF
export CONTAINERS_CONF="$CACHE/conf/containers.conf"
export CONTAINERS_STORAGE_CONF="$CACHE/conf/storage.conf"
# buildah keeps its layer tarballs here while building; /var/tmp may be small.
export TMPDIR="$CACHE/tmp"

# Installs podman, runc and debootstrap from Debian packages when missing (root, as on CI).
ensure_podman() {
    local missing=()
    command -v podman >/dev/null || missing+=(podman)
    command -v runc >/dev/null || missing+=(runc)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    if ((${#missing[@]})); then
        echo "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

# A Debian bookworm base with python3 + venv, made with debootstrap (no registry needed), cached
# in podman's storage. Stands in for python:3.11-slim-bookworm (CPU_BASE) in the CPU build.
BASE_IMAGE="localhost/granite-debian-bookworm-py:latest"
ensure_base_image() {
    if podman image exists "$BASE_IMAGE"; then
        return 0
    fi
    local rootfs="$CACHE/rootfs"
    rm -rf "$rootfs"
    echo "bootstrapping $BASE_IMAGE (debootstrap, about a minute)"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" >"$CACHE/debootstrap.log" 2>&1 \
        || { tail -20 "$CACHE/debootstrap.log"; return 1; }
    # apt lists and caches are not needed in a base image
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
}
