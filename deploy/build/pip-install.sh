#!/bin/sh
# pip inside the image's build stage, without a resolver (as the Makefile installs): the
# pinned pip first, then the lock, then the project. The build's CA bundle
# (deploy/build/ca.crt, when the build was given one) and its wheel sources
# (PIP_FIND_LINKS, PIP_INDEX_URL, PIP_EXTRA_INDEX_URL build arguments) apply to this
# stage only.
#
#   pip-install.sh VENV LOCK        # a new venv with the pinned pip and the lock
#   pip-install.sh VENV - PROJECT   # the project into it, then `pip check`
set -eu
venv="$1"
lock="$2"
if [ -f /tmp/build/ca.crt ]; then
  export PIP_CERT=/tmp/build/ca.crt
fi
for name in PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL; do
  eval "value=\${$name:-}"
  if [ -z "$value" ]; then
    unset "$name"
  fi
done
if [ "$lock" != "-" ]; then
  python -m venv "$venv"
  "$venv/bin/python" -m pip install --no-deps --require-hashes -r requirements/bootstrap.lock
  "$venv/bin/python" -m pip install --no-deps --require-hashes -r "$lock"
fi
if [ "$#" -ge 3 ]; then
  "$venv/bin/python" -m pip install --no-deps --no-build-isolation "$3"
  "$venv/bin/python" -m pip check
fi
