#!/usr/bin/env bash
# A Debian bookworm base image with Python 3.11, made locally (debootstrap, then
# `docker import`) for machines that can reach Debian's mirror but no image registry.
# Elsewhere the Dockerfile's default base (python:3.11-slim-bookworm) needs none of this.
#
#   deploy/build/base-image.sh [IMAGE]     # default routemesh-base:bookworm
set -euo pipefail
image="${1:-routemesh-base:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if docker image inspect "$image" >/dev/null 2>&1; then
  echo "$image is there already"
  exit 0
fi
rootfs="$(mktemp -d)"
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  bookworm "$rootfs" "$mirror" >/dev/null
# What python:3.11-slim offers and the Dockerfile calls: `python`.
ln -sf python3 "$rootfs/usr/bin/python"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | docker import \
  --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$image" >/dev/null
echo "$image made"
