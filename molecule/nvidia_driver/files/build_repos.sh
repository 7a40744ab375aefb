#!/usr/bin/env bash
# For molecule/nvidia_driver: a throwaway signing key and two flat apt repositories signed with
# it, shaped like NVIDIA's CUDA and libnvidia-container repositories, under OUT:
#   OUT/key.asc                                        the public key (ASCII-armored)
#   OUT/key.fpr                                        its fingerprint
#   OUT/repos/other.asc                                another key (pinning must refuse it)
#   OUT/repos/cuda/debian12/x86_64/                    nvidia-open-570 and -575, nvidia-persistenced
#                                                      570 and 575 (the pin must pick 570)
#   OUT/repos/libnvidia-container/stable/deb/amd64/    nvidia-container-toolkit
# Each repository also serves the key where NVIDIA publishes it: cuda/debian12/x86_64/3bf863cc.pub
# and libnvidia-container/gpgkey.
# The private key lives only in a temporary GNUPGHOME, removed on exit.
# Needs bash, gpg, dpkg-deb, sha256sum. Usage: build_repos.sh OUT
set -euo pipefail

out=${1:?usage: build_repos.sh OUT}
work=$(mktemp -d)
export GNUPGHOME=$work/gnupg
trap 'gpgconf --kill all >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
mkdir -m 0700 "$GNUPGHOME"
mkdir -p "$work/out/repos/cuda/debian12/x86_64" "$work/out/repos/libnvidia-container/stable/deb/amd64"

uid='comfybake molecule throwaway key <molecule@comfybake.invalid>'
gpg --batch --quiet --passphrase '' --quick-gen-key "$uid" ed25519 sign never
gpg --batch --armor --export "$uid" >"$work/out/key.asc"
gpg --batch --with-colons --list-keys "$uid" | awk -F: '$1 == "fpr" { print $10; exit }' >"$work/out/key.fpr"
other='comfybake molecule other key <other@comfybake.invalid>'
gpg --batch --quiet --passphrase '' --quick-gen-key "$other" ed25519 sign never
gpg --batch --armor --export "$other" >"$work/out/repos/other.asc"

# deb REPO NAME VERSION DEPENDS [unit]: a dummy package; "unit" adds a systemd unit named after it.
deb() {
  local repo=$1 name=$2 version=$3 depends=$4 unit=${5:-} root
  root=$work/pkg/${name}_$version
  mkdir -p "$root/DEBIAN"
  {
    printf 'Package: %s\nVersion: %s\nArchitecture: amd64\n' "$name" "$version"
    printf 'Maintainer: comfybake molecule <molecule@comfybake.invalid>\n'
    [[ -z $depends ]] || printf 'Depends: %s\n' "$depends"
    printf 'Description: stand-in for %s (molecule/nvidia_driver)\n' "$name"
  } >"$root/DEBIAN/control"
  if [[ -n $unit ]]; then
    mkdir -p "$root/lib/systemd/system"
    printf '[Unit]\nDescription=Stand-in for %s\n\n[Service]\nType=oneshot\nExecStart=/bin/true\nRemainAfterExit=yes\n\n[Install]\nWantedBy=multi-user.target\n' \
      "$name" >"$root/lib/systemd/system/$name.service"
  fi
  dpkg-deb --root-owner-group -Zgzip --build "$root" "$repo/${name}_${version}_amd64.deb" >/dev/null
}

# sign REPO: Packages, Release and InRelease of a flat repository.
sign() {
  local repo=$1 f
  (
    cd "$repo"
    for f in *.deb; do
      dpkg-deb --field "$f"
      printf 'Filename: ./%s\nSize: %s\nSHA256: %s\n\n' "$f" "$(stat -c %s "$f")" "$(sha256sum "$f" | cut -d' ' -f1)"
    done >Packages
    {
      printf 'Origin: comfybake-molecule\nLabel: comfybake-molecule\n'
      printf 'Date: %s\n' "$(LC_ALL=C date -u '+%a, %d %b %Y %H:%M:%S UTC')"
      printf 'SHA256:\n %s %s Packages\n' "$(sha256sum Packages | cut -d' ' -f1)" "$(stat -c %s Packages)"
    } >Release
    gpg --batch --yes --quiet --local-user "$uid" --clearsign --output InRelease Release
  )
}

cuda=$work/out/repos/cuda/debian12/x86_64
deb "$cuda" nvidia-persistenced 570.124.06-1 '' unit
deb "$cuda" nvidia-persistenced 575.57.08-1 '' unit
deb "$cuda" nvidia-open-570 570.124.06-1 'nvidia-persistenced (>= 570)'
deb "$cuda" nvidia-open-575 575.57.08-1 'nvidia-persistenced (>= 575)'
sign "$cuda"

toolkit=$work/out/repos/libnvidia-container/stable/deb/amd64
deb "$toolkit" nvidia-container-toolkit 1.17.8-1 ''
sign "$toolkit"

cp "$work/out/key.asc" "$cuda/3bf863cc.pub"
cp "$work/out/key.asc" "$work/out/repos/libnvidia-container/gpgkey"

chmod -R u=rwX,go=rX "$work/out"
rm -rf "$out"
mkdir -p "$(dirname "$out")"
mv "$work/out" "$out"
