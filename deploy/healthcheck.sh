#!/bin/sh
# HEALTHCHECK (installed as /usr/local/bin/fedtext-healthcheck). PID 1 is whatever the entrypoint exec'ed:
#  - fl-coordinator serve: healthy when grpc.health.v1 on its --listen port says SERVING, checked over TLS
#    against the CA in its --state-dir;
#  - anything else (fl-client run, an init step): it serves nothing, and a running process is all there is.
set -eu
port=7443
state="${FL_STATE_DIR:-/var/lib/fedtext}"
is_coordinator=0
prev=""
# /proc/1/cmdline is NUL-separated: one argument per line here.
args="$(tr '\0' '\n' </proc/1/cmdline)"
while IFS= read -r arg; do
  case "$prev" in
    --listen) port="${arg##*:}" ;;
    --state-dir) state="$arg" ;;
  esac
  case "$arg" in
    --listen=*) port="${arg##*:}" ;;
    --state-dir=*) state="${arg#*=}" ;;
    serve) [ "${prev##*/}" = fl-coordinator ] && is_coordinator=1 ;;
  esac
  prev="$arg"
done <<EOF_ARGS
$args
EOF_ARGS
[ "$is_coordinator" = 1 ] || exit 0
exec fl-health --coordinator "https://localhost:$port" --ca "$state/ca.pem"
