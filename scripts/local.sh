#!/usr/bin/env bash
# comfybake's local target: a systemd container on this machine, converged with
# playbooks/site.yml. `start` boots it (from the local base image, or COMFYBAKE_BASE_IMAGE) and
# waits for systemd; `up` checks the inventory's sources (scripts/preflight.py), starts it,
# converges it and prints its instances; `down` removes it.
#   COMFYBAKE_INVENTORY=inventories/local   the inventory to converge (make provision INVENTORY=...)
#   COMFYBAKE_MOUNTS="src:dst[:ro] ..."     folders of this machine mounted into the container,
#                                           such as git mirrors or a wheelhouse the inventory
#                                           names (make provision MOUNTS=...); a change of
#                                           mounts recreates the container
#   COMFYBAKE_LOCAL_NAME=comfybake-local    the container (the inventory's host must reach it:
#                                           ansible_host); the tests use others
#   COMFYBAKE_PREFLIGHT=0                   skip the check of the sources
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
name=${COMFYBAKE_LOCAL_NAME:-comfybake-local}
image=${COMFYBAKE_BASE_IMAGE:-comfybake/test-base:bookworm}
inventory=${COMFYBAKE_INVENTORY:-$root/inventories/local}

say() { printf 'local: %s\n' "$*"; }
die() { printf 'local: %s\n' "$@" >&2; exit "${code:-1}"; }

# The --volume arguments of COMFYBAKE_MOUNTS, with each source made absolute and checked.
volumes=()
mounts_label=""
for mount in ${COMFYBAKE_MOUNTS:-}; do
  IFS=: read -r src dst mode <<<"$mount"
  [[ -n $src && $dst == /* ]] || code=2 die "MOUNTS entry '$mount' is not src:dst[:ro] with an absolute dst" \
    "what to do next: make provision MOUNTS=\"/path/on/this/machine:/path/in/container ...\""
  [[ -e $src ]] || code=2 die "MOUNTS source '$src' does not exist on this machine" \
    "what to do next: create it (a git mirror: git clone --mirror URL DIR) or fix MOUNTS"
  src=$(cd "$(dirname "$src")" && pwd)/$(basename "$src")
  volumes+=(--volume "$src:$dst${mode:+:$mode}")
  mounts_label+="$src:$dst${mode:+:$mode} "
done

start_container() {
  if [[ $(docker inspect --format '{{.State.Running}}' "$name" 2>/dev/null) == true ]]; then
    [[ $(docker inspect --format '{{index .Config.Labels "org.comfybake.mounts"}}' "$name") == "$mounts_label" ]] &&
      return 0
    say "recreating $name: its mounts differ from MOUNTS"
  fi
  docker rm -f "$name" >/dev/null 2>&1 || true
  say "starting $name from $image"
  # systemd as PID 1 without --privileged (see docs/testing.md for why these flags).
  docker run --detach --name "$name" --hostname "$name" \
    --cap-add SYS_ADMIN --security-opt seccomp=unconfined \
    --tmpfs /run --tmpfs /run/lock --tmpfs /tmp \
    --cgroupns=host --volume /sys/fs/cgroup:/sys/fs/cgroup:rw \
    --stop-signal SIGRTMIN+3 --label org.comfybake.local=true --label "org.comfybake.mounts=$mounts_label" \
    "${volumes[@]}" "$image" /lib/systemd/systemd >/dev/null
  # systemctl cannot answer until PID 1 has set up its socket: retry for up to 60 s.
  local state=""
  for _ in $(seq 60); do
    state=$(docker exec "$name" systemctl is-system-running --wait 2>/dev/null || true)
    [[ -n $state ]] && break
    sleep 1
  done
  [[ $state == running || $state == degraded ]] ||
    die "systemd in $name did not boot (state: '${state:-none}')" \
      "what to do next: docker logs $name says why; make base-image rebuilds the base image"
}

preflight() {
  [[ ${COMFYBAKE_PREFLIGHT:-1} == 0 ]] && return 0
  local python=${COMFYBAKE_VENV:-$root/.venv}/bin/python status=0
  [[ -x $python ]] || python=python3
  "$python" "$root/scripts/preflight.py" --inventory "$inventory" --base-image "$image" \
    ${mounts_label:+--mounts "$mounts_label"} || status=$?
  ((status == 0)) || code=$status die "stopped before the converge: nothing was started or changed (see above)"
}

case "${1:-}" in
  start)
    start_container
    say "$name is running systemd"
    ;;
  up)
    [[ -d $inventory ]] || code=2 die "no inventory folder '$inventory'" \
      "what to do next: make provision INVENTORY=<folder> (copy inventories/local)"
    preflight
    start_container
    cd "$root"
    ansible-playbook -i "$inventory" playbooks/site.yml ||
      die "the converge of $name failed: the last 'fatal:' line above says why" \
        "what to do next: fix that setting in $inventory, then make provision again (a re-run keeps what was done)"
    say "converged $name with ${inventory#"$root/"}"
    status=0
    docker exec "$name" comfybake instances status || status=$?
    if ((status == 0)); then
      ports=$(docker exec "$name" comfybake instances status --json |
        python3 -c 'import json, sys; print(" ".join(str(i["port"]) for i in json.load(sys.stdin)["instances"]))')
      for port in $ports; do
        say "ComfyUI answers inside $name at http://127.0.0.1:$port (loopback only, by design)"
      done
      say "what to do next: a shell there: docker exec -it $name bash; in front of it, a reverse proxy (docs/instances.md)"
      say "manage: docker exec $name comfybake instances status|restart|diagnose; remove: make down"
    else
      say "what to do next: declare instances in ${inventory#"$root/"} (comfyui_instances, docs/instances.md), then make provision again"
    fi
    say "layout: code /opt/comfybake, config /etc/comfybake, state /var/lib/comfybake, models /srv/comfybake/models"
    ;;
  down)
    if docker rm -f "$name" >/dev/null 2>&1; then say "removed $name"; else say "$name was not running"; fi
    ;;
  *)
    echo "usage: scripts/local.sh start|up|down" >&2
    exit 2
    ;;
esac
