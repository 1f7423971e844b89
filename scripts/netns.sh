#!/usr/bin/env bash
# Run a command inside a loopback-only network namespace when this machine allows it.
#
# Ray binds to the machine's interface address by default and listens on all interfaces.
# Inside a namespace that holds only `lo`, it falls back to 127.0.0.1 and nothing can leave
# the machine. Needs root (or unprivileged user namespaces) and iproute2; otherwise the
# command runs plainly, which is what a user's laptop wants anyway.
# Set SR_PIPELINE_NO_NETNS=1 to skip the namespace.
set -euo pipefail
if [ "${SR_PIPELINE_NO_NETNS:-0}" != 1 ] && [ -z "${SR_PIPELINE_IN_NETNS:-}" ] \
   && command -v unshare >/dev/null && command -v ip >/dev/null \
   && unshare -n true 2>/dev/null; then
  export SR_PIPELINE_IN_NETNS=1
  exec unshare -n sh -c 'ip link set lo up && exec "$@"' sh "$@"
fi
exec "$@"
