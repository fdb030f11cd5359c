#!/usr/bin/env bash
# `make image`: the routemesh image on a machine without registry access. The base image
# is made locally (base-image.sh, kept between runs); pip in the build uses this
# machine's CA bundle and its local wheel directories (PyTorch's CPU wheel among them),
# served on loopback for a build on the host's network. Neither reaches the image: the
# CA bundle is read by the build stage only, and the wheels are fetched, not copied.
#
#   deploy/build/image.sh [TAG]             # default routemesh:<package version>
set -euo pipefail
cd "$(dirname "$0")/../.."
version="$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)"
tag="${1:-routemesh:$version}"
base="${BASE_IMAGE:-routemesh-base:bookworm}"
python="${PYTHON:-python3}"

deploy/build/base-image.sh "$base"

extra=()
ca="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
cleanup=()
finish() {
  for step in "${cleanup[@]}"; do eval "$step"; done
}
trap finish EXIT
if [ -f "$ca" ]; then
  cp "$ca" deploy/build/ca.crt
  cleanup+=("rm -f deploy/build/ca.crt")
fi
# pip's own find-links directories on this machine, served where the build can see them.
links="$("$python" -m pip config get global.find-links 2>/dev/null || true)"
urls=()
for dir in $links; do
  [ -d "$dir" ] || continue
  port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  "$python" -m http.server "$port" --bind 127.0.0.1 --directory "$dir" >/dev/null 2>&1 &
  cleanup+=("kill $!")
  urls+=("http://127.0.0.1:$port/")
done
if [ "${#urls[@]}" -gt 0 ]; then
  # The torch CPU wheel is among them: PyTorch's own index (the default) is not needed.
  extra+=(--build-arg "PIP_FIND_LINKS=${urls[*]}" --build-arg "PIP_EXTRA_INDEX_URL=")
fi
index="$("$python" -m pip config get global.index-url 2>/dev/null || true)"
if [ -n "$index" ]; then
  extra+=(--build-arg "PIP_INDEX_URL=$index")
fi

revision="$(git rev-parse HEAD 2>/dev/null || true)"
args=(--network host -f deploy/Dockerfile --build-arg "PYTHON_IMAGE=$base"
      --build-arg "VERSION=$version" --build-arg "REVISION=$revision" "${extra[@]}")
broker="${tag/routemesh:/routemesh-broker:}"
# The build stage tagged too: the classic builder's cache for the next build, where an
# untagged one would be pruned below.
docker build "${args[@]}" --target build -t "${tag/routemesh:/routemesh-build:}" .
docker build "${args[@]}" -t "$tag" .
# The embedded broker alone, from the same build (its stages come from the cache).
docker build "${args[@]}" --target broker -t "$broker" .
# Earlier builds' images, untagged by these: each build stage holds torch (gigabytes).
docker image prune -f --filter label=io.routemesh.stage=build >/dev/null
docker image prune -f --filter label=org.opencontainers.image.title=routemesh >/dev/null
echo "built $tag and $broker"
