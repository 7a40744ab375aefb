#!/usr/bin/env bash
# Build a systemd-capable Debian base image from Debian's archive with debootstrap and
# `docker import`, for hosts that cannot pull from a registry. Molecule scenarios and the
# Packer `test` target use it; real bakes use `ubuntu:24.04` or `nvidia/cuda:*` instead.
#
# Stop containers of this image with `docker stop --signal SIGRTMIN+3` (systemd's halt signal;
# `docker import` cannot set STOPSIGNAL) or remove them with `docker rm -f`.
#
# The image is cached by tag: it is rebuilt only when it is missing, when its recipe (this
# script, the suite, the mirror or the package list) changed, or when --force is given.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: scripts/base-image.sh [--tag TAG] [--suite SUITE] [--mirror URL] [--force]

  --tag TAG      image tag to build      (default: $COMFYBAKE_BASE_IMAGE or comfybake/test-base:bookworm)
  --suite SUITE  Debian suite            (default: bookworm)
  --mirror URL   Debian archive mirror   (default: $COMFYBAKE_DEBIAN_MIRROR or http://deb.debian.org/debian)
  --force        rebuild even if an image with the same recipe exists
USAGE
}

tag="${COMFYBAKE_BASE_IMAGE:-comfybake/test-base:bookworm}"
suite="bookworm"
mirror="${COMFYBAKE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
force=false
# What a systemd container needs to be converged by Ansible: Python for the modules,
# systemd as PID 1, and D-Bus for systemctl/systemd-run. Everything else is the roles' job.
packages="python3,systemd,systemd-sysv,dbus"

while (($#)); do
  case "$1" in
    --tag) tag="${2:?--tag needs a value}"; shift 2 ;;
    --suite) suite="${2:?--suite needs a value}"; shift 2 ;;
    --mirror) mirror="${2:?--mirror needs a value}"; shift 2 ;;
    --force) force=true; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "base-image: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done

if ! command -v docker >/dev/null; then
  echo "base-image: 'docker' is not installed; install it (Debian: apt-get install docker.io)" >&2
  exit 1
fi
recipe=$(printf '%s\n' "$suite" "$mirror" "$packages" | cat - "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)
current=$(docker image inspect --format '{{ index .Config.Labels "org.comfybake.recipe" }}' "$tag" 2>/dev/null || true)
if [[ $force == false && $current == "$recipe" ]]; then
  echo "base-image: $tag is up to date (recipe $recipe)"
  exit 0
fi

# Only a build needs debootstrap and root; an image that is up to date needs neither.
if ! command -v debootstrap >/dev/null; then
  echo "base-image: $tag must be built and 'debootstrap' is not installed; install it (Debian: apt-get install debootstrap)" >&2
  exit 1
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "base-image: $tag must be built and debootstrap needs root; run it as root (or with sudo)" >&2
  exit 1
fi

rootfs=$(mktemp -d /var/tmp/comfybake-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT

echo "base-image: debootstrap $suite from $mirror into $rootfs"
debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || {
  tail -n 30 "$rootfs.log" >&2
  echo "base-image: debootstrap failed (full log: $rootfs.log); check that $mirror is reachable" >&2
  exit 1
}
rm -f "$rootfs.log"

# Make the tree boot cleanly as a container: a fresh machine-id at every start, no package
# lists or downloaded packages baked in (as in Debian's own images), and no units that need
# hardware a container does not have.
: >"$rootfs/etc/machine-id"
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
for unit in systemd-remount-fs.service getty.target console-getty.service \
  systemd-logind.service sys-kernel-config.mount sys-kernel-debug.mount; do
  ln -sf /dev/null "$rootfs/etc/systemd/system/$unit"
done
# Docker mounts / and /run private, so mounts systemd makes in a unit's namespace never reach
# PID 1: LoadCredential= then hands services an empty folder. A host's systemd shares them.
cat >"$rootfs/etc/systemd/system/comfybake-shared-mounts.service" <<'UNIT'
[Unit]
Description=Share mount events with service namespaces, as on a host
DefaultDependencies=no
Before=sysinit.target local-fs.target
ConditionVirtualization=container

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/mount --make-rshared /

[Install]
WantedBy=sysinit.target
UNIT
mkdir -p "$rootfs/etc/systemd/system/sysinit.target.wants"
ln -sf ../comfybake-shared-mounts.service "$rootfs/etc/systemd/system/sysinit.target.wants/"

echo "base-image: importing $tag"
tar -C "$rootfs" --numeric-owner -c . | docker import \
  --change 'ENV container=docker' \
  --change 'CMD ["/lib/systemd/systemd"]' \
  --change "LABEL org.comfybake.recipe=$recipe org.comfybake.suite=$suite" \
  - "$tag" >/dev/null
echo "base-image: built $tag (recipe $recipe)"
