#!/usr/bin/env bash
# comfybake's main job on a machine with Docker and no GPU: bake the container image of a
# target (packer/targets/<target>.pkrvars.hcl, default cpu: real ComfyUI and CPU torch from
# public sources), run it with its instances' ports published on loopback, wait until every
# instance is ready, and print where they answer.
#   COMFYBAKE_TARGET=cpu                 the target to bake
#   COMFYBAKE_PACKER_ARGS="-var ..."     more Packer arguments (an inventory, mirrors, ...)
#   HF_TOKEN / CIVITAI_TOKEN             tokens for the models (never stored in the image)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
target=${COMFYBAKE_TARGET:-cpu}
name=comfybake-up
image_name=comfybake/${target}
image=${image_name}:local

say() { printf 'up: %s\n' "$*"; }

[[ -f $root/packer/targets/$target.pkrvars.hcl ]] || {
  echo "up: no target '$target': choose one of $(cd "$root/packer/targets" && ls | sed 's/.pkrvars.hcl//' | xargs)" >&2
  exit 2
}

cd "$root"
say "baking $image from packer/targets/$target.pkrvars.hcl"
# shellcheck disable=SC2086 # COMFYBAKE_PACKER_ARGS is a list of arguments
packer build -only=comfybake.docker.comfybake -var-file="packer/targets/$target.pkrvars.hcl" \
  -var "image_name=$image_name" -var image_version=local ${COMFYBAKE_PACKER_ARGS:-} packer

ports=$(docker run --rm "$image" python3 -c \
  'import json; print(" ".join(str(i["port"]) for i in json.load(open("/etc/comfybake/instances.json"))["instances"] if i["enabled"]))')
publish=()
for port in $ports; do publish+=(--publish "127.0.0.1:$port:$port"); done
docker rm -f "$name" >/dev/null 2>&1 || true
env_args=()
for token in HF_TOKEN CIVITAI_TOKEN; do [[ -n ${!token:-} ]] && env_args+=(--env "$token"); done
say "starting $name (ports ${ports:-none})"
docker run --detach --name "$name" "${publish[@]}" "${env_args[@]}" "$image" >/dev/null

for _ in $(seq 600); do
  if [[ $(docker inspect -f '{{.State.Running}}' "$name") != true ]]; then
    docker logs --tail 50 "$name" >&2
    echo "up: $name stopped (see above)" >&2
    exit 1
  fi
  if docker exec "$name" comfybake instances status >/dev/null 2>&1; then
    docker exec "$name" comfybake instances status
    for port in $ports; do say "ComfyUI answers at http://127.0.0.1:$port"; done
    say "logs: docker logs -f $name; remove: make down"
    exit 0
  fi
  sleep 1
done
docker exec "$name" comfybake instances status >&2 || true
echo "up: the instances were not ready after 600 s; see docker logs $name" >&2
exit 1
