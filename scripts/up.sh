#!/usr/bin/env bash
# comfybake's main job on a machine with Docker and no GPU: bake the container image of a
# target (packer/targets/<target>.pkrvars.hcl, default cpu: real ComfyUI and CPU torch from
# public sources), run it with the gateway's ports published on loopback (the instances listen
# on the container's loopback only), wait until every instance is ready, create the gateway's
# first user and API key, and print, once, where they answer and those credentials. Before
# anything long, scripts/preflight.py checks in seconds every source the target needs (base
# image, apt archives, git remotes, package indexes, model origins) and stops with what
# replaces each unreachable one.
#   COMFYBAKE_TARGET=cpu                 the target to bake
#   COMFYBAKE_OFFLINE=<folder>           bake from a folder of mirrors instead of the network
#                                        (make up OFFLINE=<folder>; docs/bake.md)
#   COMFYBAKE_PACKER_ARGS="-var ..."     more Packer arguments (an inventory, mirrors, ...)
#   COMFYBAKE_BOOTSTRAP=<script>         run it after the preflight, before the bake (make up
#                                        sets scripts/bootstrap.sh)
#   COMFYBAKE_PREFLIGHT=0                skip the preflight (it cannot see a proxy the bake uses)
#   HF_TOKEN / CIVITAI_TOKEN             tokens for the models (never stored in the image)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
target=${COMFYBAKE_TARGET:-cpu}
offline=${COMFYBAKE_OFFLINE:-}
name=comfybake-up
image_name=comfybake/${target}
image=${image_name}:local

say() { printf 'up: %s\n' "$*"; }
die() { printf 'up: %s\n' "$@" >&2; exit "${code:-1}"; }

targets=("$root"/packer/targets/*.pkrvars.hcl)
targets=("${targets[@]##*/}")
[[ -f $root/packer/targets/$target.pkrvars.hcl ]] || code=2 die \
  "no target '$target' (packer/targets/$target.pkrvars.hcl)" \
  "what to do next: choose one of ${targets[*]%.pkrvars.hcl}, such as make up TARGET=cpu"
if [[ -n $offline && ! -d $offline ]]; then
  code=2 die "the offline folder '$offline' does not exist" \
    "what to do next: build it on a connected machine as docs/bake.md shows (\"Offline: a folder of mirrors\"), then make up OFFLINE=<folder>"
fi

# A CUDA target's instances need a GPU to start: Docker must have NVIDIA's runtime.
gpu_args=()
flavor=$(sed -n 's/^torch_flavor *= *"\(.*\)"/\1/p' "$root/packer/targets/$target.pkrvars.hcl")
if [[ $flavor != cpu ]]; then
  runtimes=$(docker info --format '{{range $name, $_ := .Runtimes}}{{$name}} {{end}}' 2>/dev/null || true)
  [[ " $runtimes" == *" nvidia "* ]] || code=2 die \
    "target $target bakes CUDA torch ($flavor): its instances need an NVIDIA GPU, which Docker here cannot give" \
    "(no 'nvidia' runtime in docker info: the NVIDIA driver and the NVIDIA Container Toolkit are missing)" \
    "what to do next: make up (the cpu target runs without a GPU); or bake the image here and run it on a GPU host:" \
    "packer build -only=comfybake.docker.comfybake -var-file=packer/targets/$target.pkrvars.hcl packer (docs/bake.md)"
  gpu_args=(--gpus all)
fi

# The preflight needs only Python and PyYAML: the venv's, else the system's, else bootstrap first.
preflight_python() {
  local candidate
  for candidate in "${COMFYBAKE_VENV:-$root/.venv}/bin/python" python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import yaml' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

bootstrapped=false
bootstrap() {
  if [[ -n ${COMFYBAKE_BOOTSTRAP:-} && $bootstrapped == false ]]; then
    "$COMFYBAKE_BOOTSTRAP"
    bootstrapped=true
  fi
}

offline_out=$root/build/offline/$target
if [[ ${COMFYBAKE_PREFLIGHT:-1} != 0 || -n $offline ]]; then
  python=$(preflight_python) || {
    say "the preflight needs Python with PyYAML, which comes with the venv: bootstrapping first"
    bootstrap
    python=$(preflight_python) || die "no Python with PyYAML after bootstrap" \
      "what to do next: run scripts/bootstrap.sh and read its errors"
  }
  checks=(--target "$target")
  [[ -n $offline ]] && checks+=(--offline "$offline" --out "$offline_out")
  status=0
  "$python" "$root/scripts/preflight.py" "${checks[@]}" || status=$?
  if ((status != 0)); then
    code=$status die "stopped before the bake: nothing was built or started (what to change is above)"
  fi
fi
bootstrap

offline_args=()
if [[ -n $offline ]]; then
  if [[ -s $offline_out/load ]]; then
    say "loading the base image from $(<"$offline_out/load")"
    docker load --input "$(<"$offline_out/load")"
    # Loaded, the image can be looked into: does it need apt archives the folder cannot hold?
    "$python" "$root/scripts/preflight.py" "${checks[@]}" ||
      die "stopped before the bake: the loaded base image needs what the table above names"
  fi
  mapfile -t offline_args <"$offline_out/packer.args"
  say "baking from the folder of mirrors $offline (Ansible variables: ${offline_out#"$root/"}/vars.json)"
fi

cd "$root"
say "baking $image from packer/targets/$target.pkrvars.hcl"
# The offline arguments come last: they already hold the user's volumes and vars files.
# shellcheck disable=SC2086 # COMFYBAKE_PACKER_ARGS is a list of arguments
packer build -only=comfybake.docker.comfybake -var-file="packer/targets/$target.pkrvars.hcl" \
  -var "image_name=$image_name" -var image_version=local ${COMFYBAKE_PACKER_ARGS:-} "${offline_args[@]}" packer ||
  die "the bake of target $target failed: the first 'fatal:' or 'Error' line above says why" \
    "what to do next: fix that setting (COMFYBAKE_PACKER_ARGS for Packer variables, extra_vars_files or the" \
    "inventory for Ansible ones), check the sources again with scripts/preflight.py --target $target, then make up again"

# The gateway's ports (gateway.json: its routes, no secret), else the instances' (an image baked
# with comfyui_gateway_enabled false).
ports=$(docker run --rm "$image" python3 -c '
import json, os
gateway = "/etc/comfybake/gateway/gateway.json"
if os.path.exists(gateway):
    routes = json.load(open(gateway))["routes"]
    ports = {route["port"] for route in routes["instances"] + routes["environments"]}
else:
    ports = {i["port"] for i in json.load(open("/etc/comfybake/instances.json"))["instances"] if i["enabled"]}
print(" ".join(map(str, sorted(ports))))')
publish=()
for port in $ports; do publish+=(--publish "127.0.0.1:$port:$port"); done
docker rm -f "$name" >/dev/null 2>&1 || true
env_args=()
for token in HF_TOKEN CIVITAI_TOKEN; do [[ -n ${!token:-} ]] && env_args+=(--env "$token"); done
# Only the capabilities the entrypoint and supervisord need to run each instance as its own
# account (docs/bake.md); the tokens reach only the model fetch.
caps=(--cap-drop ALL --cap-add CHOWN --cap-add SETUID --cap-add SETGID --cap-add KILL --security-opt no-new-privileges)
say "starting $name (ports ${ports:-none})"
docker run --detach --name "$name" "${caps[@]}" "${gpu_args[@]}" "${publish[@]}" "${env_args[@]}" "$image" >/dev/null

# The gateway's first user and API key, made in the container (only bcrypt hashes stay there) and
# printed here once; its CA, made when the gateway first started, for clients to trust.
gateway() {
  local user key ca=$root/build/up/$name-ca.crt
  user=$(docker exec "$name" comfybake gateway users add admin --scope '*' --generate) ||
    die "the gateway's first user could not be made (the line above says why)"
  key=$(docker exec "$name" comfybake gateway keys create admin-key --scope '*') ||
    die "the gateway's first API key could not be made (the line above says why)"
  mkdir -p "$(dirname "$ca")"
  for _ in $(seq 30); do
    docker cp "$name:/var/lib/comfybake-gateway/pki/authorities/local/root.crt" "$ca" >/dev/null 2>&1 && break
    sleep 1
  done
  [[ -s $ca ]] || die "the gateway made no CA certificate: docker logs $name says why"
  docker exec "$name" python3 -c '
import json
routes = json.load(open("/etc/comfybake/gateway/gateway.json"))["routes"]
for route in routes["instances"]:
    print("up: instance %s answers at %s" % (route["name"], route["public_url"]))
for route in routes["environments"]:
    print("up: environment %s (%s) answers at %s" % (route["name"], ", ".join(route["instances"]), route["public_url"]))'
  say "the gateway's CA (trust it, or curl --cacert): $ca"
  say "sign in as admin with the password $user (shown only now: comfybake gateway users add makes others)"
  say "API key admin-key: $key (Authorization: Bearer <key>; shown only now)"
  say "for example: curl --cacert $ca -H 'Authorization: Bearer <key>' https://localhost:${ports%% *}/system_stats"
}

for _ in $(seq 600); do
  if [[ $(docker inspect -f '{{.State.Running}}' "$name") != true ]]; then
    docker logs --tail 50 "$name" >&2
    die "$name stopped (its last lines are above)" \
      "what to do next: fix what they name (a model fetch needs HF_TOKEN or CIVITAI_TOKEN), then make up again"
  fi
  if docker exec "$name" comfybake instances status >/dev/null 2>&1; then
    docker exec "$name" comfybake instances status
    if docker exec "$name" test -f /etc/comfybake/gateway/gateway.json; then
      gateway
    else
      for port in $ports; do say "ComfyUI answers at http://127.0.0.1:$port"; done
    fi
    say "what to do next: open a URL above; logs: docker logs -f $name; status: docker exec $name comfybake instances status"
    say "remove it with make down; bake another target with make up TARGET=<target> (docs/bake.md)"
    exit 0
  fi
  sleep 1
done
docker exec "$name" comfybake instances status >&2 || true
die "the instances were not ready after 600 s" \
  "what to do next: docker logs $name and docker exec $name comfybake instances diagnose say why; make down removes it"
