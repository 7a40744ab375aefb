#!/usr/bin/env bash
# Prepare this machine for comfybake's main job and tests, skipping every step already done:
#   1. Debian packages (docker.io, packer, debootstrap, git, caddy, prometheus, ...), installed as root;
#   2. a running Docker engine (systemd's docker.service, or dockerd started here);
#   3. the project venv (.venv), installed from pyproject.toml with requirements/constraints.txt;
#   4. the host's comfybake command (scripts/build-cli.py: roles/comfyui/files/comfybake.pyz);
#   5. the local systemd base image (scripts/base-image.sh), cached by tag.
# Environment: COMFYBAKE_VENV (venv path), PYTHON (interpreter for the venv, >= 3.11),
# COMFYBAKE_SKIP_SYSTEM=1 (never touch apt or the engine: for machines set up by hand).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${COMFYBAKE_VENV:-$root/.venv}
python=${PYTHON:-python3}
# caddy and chromium: the gateway tests run the real proxy and a real browser in front of it;
# prometheus: promtool checks the exporter's alert rules, and the server scrapes it in tests;
# qemu, cloud-image-utils and fdisk: the VM bake's base disk (scripts/base-vm.sh), its seeds and boots;
# polkitd (with dbus-daemon): a real polkitd judges the job service's rule (tests/gateway/test_control_privileges.py)
packages=(docker.io packer debootstrap git make python3-venv ca-certificates curl caddy chromium prometheus
  qemu-system-x86 qemu-utils cloud-image-utils fdisk polkitd dbus-daemon)
dockerd_log=${COMFYBAKE_DOCKERD_LOG:-/var/log/comfybake-dockerd.log}

say() { printf 'bootstrap: %s\n' "$*"; }
die() { printf 'bootstrap: error: %s\n' "$*" >&2; exit 1; }

install_packages() {
  local missing=() pkg
  for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
  done
  ((${#missing[@]})) || return 0
  [[ $(id -u) -eq 0 ]] || die "missing Debian packages: ${missing[*]}; install them as root (apt-get install ${missing[*]}) or re-run as root"
  say "installing ${missing[*]}"
  # Debian's caddy package starts caddy.service (a file server on :80, an admin API on TCP
  # :2019) and prometheus starts prometheus.service (:9090, scraping this machine) on a machine
  # run by systemd; the tests run their own, so both are masked first and never start.
  if [[ -d /run/systemd/system ]]; then
    systemctl mask --now caddy.service caddy-api.service prometheus.service >/dev/null 2>&1 || true
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

start_engine() {
  docker info >/dev/null 2>&1 && return 0
  if [[ -d /run/systemd/system ]]; then
    say "starting docker.service"
    systemctl start docker.service
  else
    [[ $(id -u) -eq 0 ]] || die "the Docker engine is not running and only root can start dockerd; start it, then re-run"
    say "starting dockerd (log: $dockerd_log)"
    nohup dockerd >"$dockerd_log" 2>&1 &
  fi
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && return 0
    sleep 1
  done
  [[ -f $dockerd_log ]] && tail -n 20 "$dockerd_log" >&2
  die "the Docker engine did not answer 'docker info' within 60 s"
}

make_venv() {
  "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "$python is $("$python" --version 2>&1); comfybake needs Python >= 3.11 (set PYTHON=/path/to/python3.11)"
  local stamp
  stamp=$(cat "$root/pyproject.toml" "$root/requirements/constraints.txt" | sha256sum | cut -d' ' -f1)
  [[ -f $venv/.comfybake-stamp && $(<"$venv/.comfybake-stamp") == "$stamp" ]] && return 0
  say "installing the project into $venv"
  [[ -x $venv/bin/python ]] || "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -c "$root/requirements/constraints.txt" -e "$root[dev]"
  echo "$stamp" >"$venv/.comfybake-stamp"
}

if [[ ${COMFYBAKE_SKIP_SYSTEM:-0} != 1 ]]; then
  install_packages
  start_engine
fi
make_venv
"$venv/bin/python" "$root/scripts/build-cli.py"
"$root/scripts/base-image.sh"
