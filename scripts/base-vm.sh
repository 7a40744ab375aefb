#!/usr/bin/env bash
# Build a cloud-style Debian VM disk (qcow2) from Debian's archive alone: debootstrap onto a
# loop device, a kernel, GRUB on the disk's MBR, cloud-init with the NoCloud datasource, SSH.
# The Packer `test` target's qemu source boots it (tests/packer/test_vm.py); real VM bakes use
# their cloud's base image instead (docs/bake.md).
#
# Like a cloud image it has no account and no way in: cloud-init makes the default user
# `debian` (sudo without a password) with the SSH keys of the seed it boots with. The root
# filesystem grows to the disk's size at first boot (growpart, resize2fs).
#
# The disk is cached: it is rebuilt only when it is missing, when its recipe (this script, the
# suite, the mirror or the package list) changed, or when --force is given. The recipe's hash
# is in <output>.recipe.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: scripts/base-vm.sh [--output FILE] [--suite SUITE] [--mirror URL] [--size SIZE] [--force]

  --output FILE  qcow2 to write         (default: $COMFYBAKE_BASE_VM or build/vm/base-bookworm.qcow2)
  --suite SUITE  Debian suite           (default: bookworm)
  --mirror URL   Debian archive mirror  (default: $COMFYBAKE_DEBIAN_MIRROR or http://deb.debian.org/debian)
  --size SIZE    virtual disk size      (default: 3G; a VM's disk may be larger, the root grows)
  --force        rebuild even if a disk with the same recipe exists
USAGE
}

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
output="${COMFYBAKE_BASE_VM:-$root/build/vm/base-bookworm.qcow2}"
suite="bookworm"
mirror="${COMFYBAKE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
size="3G"
force=false
# A cloud image's parts, and Python for Ansible, installed with apt once debootstrap made the
# base system (the kernel's and GRUB's scripts need /dev, /proc and /sys). systemd-networkd and
# -resolved bring up every Ethernet interface with DHCP, so the disk boots on any virtual NIC.
packages="linux-image-cloud-amd64 grub-pc initramfs-tools systemd-sysv systemd-resolved udev dbus \
cloud-init cloud-guest-utils openssh-server sudo python3 ca-certificates iproute2 netbase procps"

while (($#)); do
  case "$1" in
    --output) output="${2:?--output needs a value}"; shift 2 ;;
    --suite) suite="${2:?--suite needs a value}"; shift 2 ;;
    --mirror) mirror="${2:?--mirror needs a value}"; shift 2 ;;
    --size) size="${2:?--size needs a value}"; shift 2 ;;
    --force) force=true; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "base-vm: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done

recipe=$(printf '%s\n' "$suite" "$mirror" "$packages" "$size" | cat - "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)
if [[ $force == false && -f $output && $(cat "$output.recipe" 2>/dev/null) == "$recipe" ]]; then
  echo "base-vm: $output is up to date (recipe $recipe)"
  exit 0
fi

# Only a build needs these and root; a disk that is up to date needs neither.
missing=()
for tool in debootstrap qemu-img sfdisk partx losetup mkfs.ext4; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
  echo "base-vm: $output must be built and ${missing[*]} missing; install them (Debian: apt-get install debootstrap qemu-utils fdisk util-linux e2fsprogs)" >&2
  exit 1
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "base-vm: $output must be built and debootstrap and loop devices need root; run it as root (or with sudo)" >&2
  exit 1
fi

# The same recipe gives the same filesystem UUID, so GRUB's menu and fstab do not change.
uuid=$(printf '%s' "$recipe" | sha256sum | sed -E 's/^(.{8})(.{4}).(.{3}).(.{3})(.{12}).*/\1-\2-4\3-8\4-\5/')
work=$(mktemp -d /var/tmp/comfybake-vm.XXXXXX)
raw="$work/disk.raw"
mnt="$work/root"
loop=""
cleanup() {
  for path in dev/pts dev proc sys ""; do
    mountpoint -q "$mnt/$path" 2>/dev/null && umount "$mnt/$path"
  done
  [[ -n $loop ]] && { partx -d "$loop" 2>/dev/null || true; losetup -d "$loop"; }
  rm -rf "$work"
}
trap cleanup EXIT

# One MBR partition from 1 MiB: GRUB's core image sits in the gap before it.
truncate -s "$size" "$raw"
printf 'label: dos\nstart=2048, type=83, bootable\n' | sfdisk --quiet "$raw"
loop=$(losetup --find --show "$raw")
partx --add "$loop" # the partition's device, where the kernel does not scan loop devices itself
mkfs.ext4 -q -L comfybake-root -U "$uuid" "${loop}p1"
mkdir -p "$mnt"
mount "${loop}p1" "$mnt"

echo "base-vm: debootstrap $suite from $mirror onto $loop"
debootstrap --variant=minbase "$suite" "$mnt" "$mirror" >"$work/install.log" 2>&1 || {
  tail -n 30 "$work/install.log" >&2
  echo "base-vm: debootstrap failed; check that $mirror is reachable" >&2
  exit 1
}
for path in dev dev/pts proc sys; do
  mount --bind "/$path" "$mnt/$path"
done
echo "base-vm: installing the kernel, GRUB, cloud-init and SSH"
# shellcheck disable=SC2086 # the package list is words
DEBIAN_FRONTEND=noninteractive chroot "$mnt" apt-get install -y -q --no-install-recommends $packages >>"$work/install.log" 2>&1 || {
  tail -n 30 "$work/install.log" >&2
  echo "base-vm: installing the packages failed (list above)" >&2
  exit 1
}

cat >"$mnt/etc/fstab" <<FSTAB
UUID=$uuid / ext4 errors=remount-ro 0 1
FSTAB
: >"$mnt/etc/machine-id"
printf 'debian\n' >"$mnt/etc/hostname"

# Network: DHCP on every Ethernet interface; cloud-init leaves the network alone.
cat >"$mnt/etc/systemd/network/80-comfybake-dhcp.network" <<'NETWORK'
[Match]
Type=ether

[Network]
DHCP=yes
NETWORK
cat >"$mnt/etc/cloud/cloud.cfg.d/90-comfybake.cfg" <<'CLOUD'
# comfybake base VM: the NoCloud datasource (a seed disk labelled cidata, or ds=nocloud on the
# kernel command line); systemd-networkd configures the network.
datasource_list: [NoCloud, None]
network: {config: disabled}
locale: C.UTF-8  # the one locale a minimal system has
CLOUD

# GRUB: the serial console, no menu wait.
cat >>"$mnt/etc/default/grub" <<'GRUB'
# comfybake base VM
GRUB_TIMEOUT=0
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="console=tty0 console=ttyS0,115200"
GRUB_TERMINAL="console serial"
GRUB_SERIAL_COMMAND="serial --speed=115200"
GRUB
chroot "$mnt" systemctl enable --quiet systemd-networkd systemd-resolved
chroot "$mnt" grub-install --target=i386-pc "$loop" >"$work/grub.log" 2>&1 || {
  cat "$work/grub.log" >&2
  echo "base-vm: grub-install onto $loop failed" >&2
  exit 1
}
chroot "$mnt" update-grub >>"$work/grub.log" 2>&1
# Without udev here GRUB names the root by this machine's device; in the VM it is the UUID.
sed -i "s|root=${loop}p1 |root=UUID=$uuid |" "$mnt/boot/grub/grub.cfg"
grep -q "root=UUID=$uuid " "$mnt/boot/grub/grub.cfg" || {
  echo "base-vm: GRUB's menu does not boot root=UUID=$uuid (see $mnt/boot/grub/grub.cfg)" >&2
  exit 1
}
ln -sf /run/systemd/resolve/stub-resolv.conf "$mnt/etc/resolv.conf"

# Nothing of this machine: no package lists or downloads, no SSH host keys (made at first boot).
rm -rf "$mnt"/var/lib/apt/lists/* "$mnt"/var/cache/apt/*.bin "$mnt"/var/cache/apt/archives/*.deb
rm -f "$mnt"/etc/ssh/ssh_host_*
fstrim "$mnt" # freed blocks become holes: the qcow2 holds only what the filesystem uses
for path in dev/pts dev proc sys ""; do
  umount "$mnt/$path"
done
partx -d "$loop"
losetup -d "$loop"
loop=""

mkdir -p "$(dirname "$output")"
qemu-img convert -O qcow2 "$raw" "$output.tmp"
mv "$output.tmp" "$output"
printf '%s\n' "$recipe" >"$output.recipe"
echo "base-vm: built $output (recipe $recipe, $(du -h "$output" | cut -f1))"
