#!/usr/bin/env bash
# Builds a Debian bookworm base image with Python 3.11 from Debian's package mirror
# alone, for machines that cannot pull from a container registry. Needs root and
# debootstrap. Then build dpfl on it:
#   docker/build-base-image.sh [TAG]          # default dpfl-base:bookworm
#   docker build -f docker/Dockerfile --build-arg BASE_IMAGE=dpfl-base:bookworm -t dpfl:latest .
set -euo pipefail

tag=${1:-dpfl-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if [ "$(id -u)" -ne 0 ]; then
    echo "build-base-image.sh: error: debootstrap needs root" >&2
    exit 2
fi
if ! command -v debootstrap >/dev/null; then
    echo "build-base-image.sh: error: debootstrap is not installed (apt-get install debootstrap)" >&2
    exit 2
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if ! debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1; then
    tail -n 20 "$work/debootstrap.log" >&2
    echo "build-base-image.sh: error: debootstrap failed (log above)" >&2
    exit 1
fi
# Package lists and caches are only dead weight in an image.
rm -rf "$work/rootfs/var/lib/apt/lists/"* "$work/rootfs/var/cache/apt/"*
tar -C "$work/rootfs" -c . | docker import -c 'ENV LANG=C.UTF-8' -c 'CMD ["/bin/bash"]' - "$tag" >/dev/null
echo "built $tag"
