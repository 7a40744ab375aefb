#!/usr/bin/env bash
# comfybake's local target: a systemd container on this machine, converged with
# playbooks/site.yml through inventories/local. `start` boots it (from the local base image,
# or COMFYBAKE_BASE_IMAGE) and waits for systemd; `up` starts it and converges it; `down`
# removes it. COMFYBAKE_LOCAL_NAME gives `start` and `down` another container (the tests try
# the built collection on one from a project of their own).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
name=${COMFYBAKE_LOCAL_NAME:-comfybake-local}
image=${COMFYBAKE_BASE_IMAGE:-comfybake/test-base:bookworm}

say() { printf 'local: %s\n' "$*"; }

start_container() {
  if [[ $(docker inspect --format '{{.State.Running}}' "$name" 2>/dev/null) == true ]]; then
    return 0
  fi
  docker rm -f "$name" >/dev/null 2>&1 || true
  say "starting $name from $image"
  # systemd as PID 1 without --privileged (see docs/testing.md for why these flags).
  docker run --detach --name "$name" --hostname "$name" \
    --cap-add SYS_ADMIN --security-opt seccomp=unconfined \
    --tmpfs /run --tmpfs /run/lock --tmpfs /tmp \
    --cgroupns=host --volume /sys/fs/cgroup:/sys/fs/cgroup:rw \
    --stop-signal SIGRTMIN+3 --label org.comfybake.local=true \
    "$image" /lib/systemd/systemd >/dev/null
  # systemctl cannot answer until PID 1 has set up its socket: retry for up to 60 s.
  local state=""
  for _ in $(seq 60); do
    state=$(docker exec "$name" systemctl is-system-running --wait 2>/dev/null || true)
    [[ -n $state ]] && break
    sleep 1
  done
  [[ $state == running || $state == degraded ]] || {
    echo "local: systemd in $name did not boot (state: '${state:-none}'); see 'docker logs $name'" >&2
    exit 1
  }
}

case "${1:-}" in
  start)
    start_container
    say "$name is running systemd"
    ;;
  up)
    start_container
    cd "$root"
    ansible-playbook playbooks/site.yml
    say "converged $name; open a shell with: docker exec -it $name bash"
    say "layout: code /opt/comfybake, config /etc/comfybake, state /var/lib/comfybake, models /srv/comfybake/models"
    ;;
  down)
    docker rm -f "$name" >/dev/null 2>&1 && say "removed $name" || say "$name was not running"
    ;;
  *)
    echo "usage: scripts/local.sh start|up|down" >&2
    exit 2
    ;;
esac
