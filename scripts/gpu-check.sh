#!/usr/bin/env bash
# What no CI machine can check, run on a machine with an NVIDIA GPU and a checkout of comfybake
# (its venv from scripts/bootstrap.sh or `make`): the roles converge this machine itself
# (connection local) from a small generated inventory, vars file and playbooks, then each check
# prints PASS, FAIL or SKIP and a summary closes the run. docs/gpu.md explains each line.
#   1 driver     the nvidia_driver role's verify step (nvidia-smi: every GPU on the driver
#                branch), and the device nodes nvidia-smi makes (/dev/nvidiactl, /dev/nvidia<i>)
#   2 torch      an environment of comfyui_environments with a CUDA torch flavour, and a CUDA
#                torch import in its venv that names the GPU
#   3 instances  two instances pinned to GPU 0 with share_gpus and one alone on GPU 1 (SKIP on
#                a machine with one GPU), each reporting in /system_stats the GPU its
#                CUDA_VISIBLE_DEVICES names, with its process on that GPU in nvidia-smi
#   4 unit       the hardened units' device access: DevicePolicy=closed, DeviceAllow=char-nvidia*,
#                nvidia-devnodes.service and the nodes it makes, systemd-analyze security exposure
# Exit 0 when no check failed, 1 when one did, 2 when it refused to start (nothing was changed).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${COMFYBAKE_VENV:-$root/.venv}

# What the checks converge: one environment and three instances, whose names and ports are
# the check's own (an extra-vars file may replace the environment's sources, not these).
environment=gpucheck
ports=(8388 8389 8390)
max_exposure=2.0 # as the instances scenario requires of comfyui@.service

usage() {
  cat <<'USAGE'
usage: sudo scripts/gpu-check.sh [--only N[,M...]] [--extra-vars FILE]... [--keep] [--workdir DIR] [--dry-run]

Checks, on this machine (root, an NVIDIA GPU), what CI cannot:
  1  driver     the nvidia_driver role's verify step and the NVIDIA device nodes
  2  torch      an environment with a CUDA torch flavour (default cu128) imports torch on the GPU
  3  instances  two instances share GPU 0 (share_gpus), one runs alone on GPU 1 (SKIP with one
                GPU); each reports its GPU in /system_stats
  4  unit       the instances' units: DevicePolicy/DeviceAllow, nvidia-devnodes.service,
                systemd-analyze security exposure (at most 2.0)

  --only N[,M]       run only these checks (checks 3 and 4 converge the environment of 2 too)
  --extra-vars FILE  an Ansible vars file for the converges, after the check's own settings:
                     mirrors and a wheelhouse on an offline machine
                     (comfyui_environments_git_mirrors, comfyui_environments_wheelhouse_src, ...),
                     comfyui_environments_default_torch_flavor, nvidia_driver_branch; repeatable
  --keep             leave the instances running (default: removed at the end, with their state)
  --workdir DIR      where the inventory, playbooks and logs go (default: a new folder in $TMPDIR)
  --dry-run          write them and print the commands; run nothing (no GPU or root needed)
  -h, --help         this text

It converges the environment gpucheck (/opt/comfybake/envs/gpucheck, kept for the next run) and
the instances gpucheck-shared-a, gpucheck-shared-b and gpucheck-alone on ports 8388-8390, so it
refuses a machine where other comfybake instances run (the converge would remove them).
Exit: 0 no check failed (SKIP lines say what this machine could not show), 1 a check failed,
2 refused before changing anything.
USAGE
}

say() { printf 'gpu-check: %s\n' "$*"; }
refuse() {
  printf 'gpu-check: %s\n' "$@" >&2
  exit 2
}

# ----------------------------------------------------------------------------- options

only="" only_given=false
keep=false
dry_run=false
workdir=""
extra_vars=()
while (($#)); do
  case $1 in
    -h | --help)
      usage
      exit 0
      ;;
    --only | --extra-vars | --workdir)
      (($# >= 2)) || refuse "option $1 needs a value (see --help)"
      set -- "$1=$2" "${@:3}"
      continue
      ;;
    --only=*) only=${1#*=} only_given=true ;;
    --extra-vars=*)
      file=${1#*=}
      [[ -f $file && -r $file ]] || refuse "--extra-vars '$file' is not a readable file; give the path of an Ansible vars file (YAML or JSON)"
      extra_vars+=("$(cd "$(dirname "$file")" && pwd)/$(basename "$file")")
      ;;
    --workdir=*) workdir=${1#*=} ;;
    --keep) keep=true ;;
    --dry-run) dry_run=true ;;
    *) refuse "unknown option '$1'; see scripts/gpu-check.sh --help" ;;
  esac
  shift
done

declare -A selected=()
if ! $only_given; then
  selected=([1]=1 [2]=1 [3]=1 [4]=1)
else
  IFS=, read -ra wanted <<<"$only"
  ((${#wanted[@]})) || refuse "--only '' names no check; give numbers from 1 to 4, such as --only 1,2"
  for n in "${wanted[@]}"; do
    [[ $n =~ ^[1-4]$ ]] || refuse "--only '$only': '$n' is not a check; give numbers from 1 to 4, such as --only 1,2"
    selected[$n]=1
  done
fi
wants() { [[ -n ${selected[$1]:-} ]]; }

# ----------------------------------------------------------------------------- this machine

gpu_index=() gpu_name=() gpu_uuid=() driver=""
read_gpus() {
  local index name uuid version
  while IFS=, read -r index name uuid version; do
    [[ -n $index ]] || continue
    gpu_index+=("${index// /}")
    name=${name#"${name%%[! ]*}"}
    gpu_name+=("$name")
    gpu_uuid+=("${uuid// /}")
    driver=${version// /}
  done < <(nvidia-smi --query-gpu=index,name,uuid,driver_version --format=csv,noheader)
}

if $dry_run; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    read_gpus
  else
    say "dry run without a GPU: the files are written as for two GPUs" >&2
    gpu_index=(0 1) gpu_name=("GPU 0" "GPU 1") gpu_uuid=("" "") driver=""
  fi
else
  [[ $(id -u) -eq 0 ]] ||
    refuse "run as root (sudo scripts/gpu-check.sh ...): the checks install comfybake under /opt/comfybake and systemd units"
  command -v nvidia-smi >/dev/null ||
    refuse "no NVIDIA GPU here: nvidia-smi is not installed; run this on a machine with an NVIDIA GPU and its driver (the nvidia_driver role installs it, docs/nvidia.md)"
  listed=$(nvidia-smi -L 2>&1) && status=0 || status=$?
  [[ $status -eq 0 && $listed == *GPU* ]] ||
    refuse "no NVIDIA GPU here: nvidia-smi -L exited $status and listed none (${listed:-no output}); run this on a machine with an NVIDIA GPU whose driver is loaded"
  [[ -x $venv/bin/ansible-playbook ]] ||
    refuse "no ansible-playbook in $venv; run scripts/bootstrap.sh (or make) first, or set COMFYBAKE_VENV to the venv"
  [[ -f $root/roles/comfyui/files/comfybake.pyz ]] ||
    refuse "no host command roles/comfyui/files/comfybake.pyz (the roles install it); build it: $venv/bin/python scripts/build-cli.py"
  if wants 3 || wants 4; then
    others=()
    for file in /etc/comfybake/instances/*.env; do
      [[ -e $file ]] || continue
      name=$(basename "$file" .env)
      [[ $name == gpucheck-* ]] || others+=("$name")
    done
    ((${#others[@]} == 0)) ||
      refuse "this machine runs comfybake instances (${others[*]}) that the check's converge would remove; run checks 3 and 4 on a machine without them, or --only 1,2"
  fi
  read_gpus
fi

if [[ -z $workdir ]]; then
  workdir=$(mktemp -d "${TMPDIR:-/tmp}/comfybake-gpu-check.XXXXXX")
else
  mkdir -p "$workdir"
  workdir=$(cd "$workdir" && pwd)
fi

# ----------------------------------------------------------------------------- what runs

# GPU 0 shared by two instances; GPU 1, when there is one, for one instance alone.
instances=("gpucheck-shared-a:${ports[0]}:0" "gpucheck-shared-b:${ports[1]}:0")
((${#gpu_index[@]} >= 2)) && instances+=("gpucheck-alone:${ports[2]}:1")

cat >"$workdir/inventory.yml" <<'YAML'
---
# Written by scripts/gpu-check.sh: this machine, converged by itself.
comfybake:
  hosts:
    localhost:
      ansible_connection: local
      ansible_python_interpreter: /usr/bin/python3
YAML
# The site-wide settings every comfybake playbook loads (playbooks/group_vars).
ln -sfn "$root/group_vars" "$workdir/group_vars"

{
  printf '%s\n' '---' \
    '# Written by scripts/gpu-check.sh: what the checks converge. Files given with --extra-vars' \
    '# come after this one and win.' \
    "gpu_check_dir: $workdir" \
    "gpu_check_environment: $environment"
  if [[ -n $driver ]]; then
    printf '# The installed driver is %s: its branch is the one checked.\n' "$driver"
    printf 'nvidia_driver_branch: "%s"\n' "${driver%%.*}"
  fi
  cat <<YAML
comfyui_gateway_enabled: false
comfyui_exporter_enabled: false
comfyui_environments_default_torch_flavor: cu128
comfyui_environments:
  $environment:
    comfyui_repo: https://github.com/comfyanonymous/ComfyUI.git
    comfyui_version: v0.8.0
    custom_nodes: []
comfyui_instances_gpu_devices: true
comfyui_instances_keep_removed_state: false
gpu_check_instances:
YAML
  for instance in "${instances[@]}"; do
    IFS=: read -r name port gpu <<<"$instance"
    if [[ $name == *shared* ]]; then
      printf '  - {name: %s, environment: %s, port: %s, gpus: [%s], share_gpus: true}\n' "$name" "$environment" "$port" "$gpu"
    else
      printf '  - {name: %s, environment: %s, port: %s, gpus: [%s]}\n' "$name" "$environment" "$port" "$gpu"
    fi
  done
} >"$workdir/vars.yml"

cat >"$workdir/driver.yml" <<'YAML'
---
- name: GPU check 1, the nvidia_driver role's verify step
  hosts: comfybake
  tasks:
    - name: Require every GPU on the driver branch (nvidia_driver_branch)
      ansible.builtin.include_role:
        name: comfybake.core.nvidia_driver
        tasks_from: verify.yml
      vars:
        nvidia_driver_verify_gpu: true
YAML

cat >"$workdir/environment.yml" <<'YAML'
---
- name: GPU check 2, a CUDA torch in an environment
  hosts: comfybake
  tasks:
    - name: Build the environment
      ansible.builtin.include_role:
        name: comfybake.core.comfyui_environments

    - name: Import torch in the environment's venv and ask CUDA for the GPU
      ansible.builtin.command:
        argv:
          - "{{ comfyui_code_root }}/envs/{{ gpu_check_environment }}/current/venv/bin/python"
          - -c
          - >-
            import torch;
            assert torch.cuda.is_available(), 'torch ' + torch.__version__ + ': torch.cuda.is_available() is False';
            print(torch.__version__, 'CUDA', torch.version.cuda, '-', torch.cuda.device_count(), 'GPU(s), cuda:0 is',
            torch.cuda.get_device_name(0))
      register: __gpu_check_torch
      changed_when: false

    - name: Record what torch reported
      ansible.builtin.copy:
        content: "{{ __gpu_check_torch.stdout }}\n"
        dest: "{{ gpu_check_dir }}/torch.txt"
        mode: "0644"
YAML

cat >"$workdir/instances.yml" <<'YAML'
---
- name: GPU check 3, instances pinned to GPUs
  hosts: comfybake
  vars:
    comfyui_instances: "{{ gpu_check_instances }}"
  roles:
    - role: comfybake.core.comfyui_instances
YAML

cat >"$workdir/cleanup.yml" <<'YAML'
---
- name: Remove the instances of the GPU check, with their state
  hosts: comfybake
  vars:
    comfyui_instances: []
  roles:
    - role: comfybake.core.comfyui_instances
YAML

playbook() { # playbook NAME: run it, its output in NAME.log
  local args=(-i "$workdir/inventory.yml" -e "@$workdir/vars.yml")
  local file
  for file in "${extra_vars[@]}"; do args+=(-e "@$file"); done
  if $dry_run; then
    printf 'ANSIBLE_CONFIG=%q %q' "$root/ansible.cfg" "$venv/bin/ansible-playbook"
    printf ' %q' "${args[@]}" "$workdir/$1.yml"
    printf '\n'
    return 0
  fi
  ANSIBLE_CONFIG=$root/ansible.cfg PATH=$venv/bin:$PATH ANSIBLE_NOCOLOR=1 \
    "$venv/bin/ansible-playbook" "${args[@]}" "$workdir/$1.yml" >"$workdir/$1.log" 2>&1
}

if $dry_run; then
  say "wrote $workdir: inventory.yml, vars.yml and the playbooks; the checks would run:"
  wants 1 && playbook driver
  if wants 2 || wants 3 || wants 4; then playbook environment; fi
  if wants 3 || wants 4; then
    playbook instances
    $keep || playbook cleanup
  fi
  exit 0
fi

# ----------------------------------------------------------------------------- reporting

passed=0 failed=0 skipped=0
report() { # report PASS|FAIL|SKIP WHAT DETAIL
  printf '%-4s %s: %s\n' "$1" "$2" "$3"
  case $1 in
    PASS) passed=$((passed + 1)) ;;
    FAIL) failed=$((failed + 1)) ;;
    SKIP) skipped=$((skipped + 1)) ;;
  esac
}
why() { # the lines of a playbook log that say what failed
  grep -m1 -A8 -E 'FAILED!|ERROR!|UNREACHABLE!' "$workdir/$1.log" | cut -c1-300 | sed 's/^/       /' || true
  printf '       (whole log: %s)\n' "$workdir/$1.log"
}

say "${#gpu_index[@]} GPU(s), driver $driver:"
for i in "${!gpu_index[@]}"; do say "  ${gpu_index[$i]} ${gpu_name[$i]} ${gpu_uuid[$i]}"; done
say "work folder (playbooks and logs): $workdir"

# ----------------------------------------------------------------------------- 1 driver

if wants 1; then
  say "1: the nvidia_driver role's verify step"
  if playbook driver; then
    missing=()
    for node in /dev/nvidiactl "${gpu_index[@]/#//dev/nvidia}"; do
      [[ -c $node ]] || missing+=("$node")
    done
    if ((${#missing[@]})); then
      report FAIL "1 driver" "nvidia-smi passed the verify, but ${missing[*]} is not a character device"
    else
      report PASS "1 driver" "the verify step found every GPU on nvidia_driver_branch (installed: $driver); /dev/nvidiactl and /dev/nvidia<index> of each GPU present"
    fi
  else
    report FAIL "1 driver" "the nvidia_driver verify step failed"
    why driver
  fi
fi

# ----------------------------------------------------------------------------- 2 torch

built=false
if wants 2 || wants 3 || wants 4; then
  say "2: building the environment $environment and importing torch in it (minutes; log: $workdir/environment.log)"
  start=$SECONDS
  if playbook environment; then
    built=true
    wants 2 && report PASS "2 torch" "$(cat "$workdir/torch.txt") (environment built and checked in $((SECONDS - start)) s)"
  else
    wants 2 && report FAIL "2 torch" "the environment $environment did not build, or torch saw no GPU in it"
    why environment
  fi
fi

# ----------------------------------------------------------------------------- 3 instances

# Each instance's /system_stats, process and environment file against nvidia-smi's GPUs:
# prints one PASS or FAIL line per instance (name port gpu triples as arguments).
check_instances() {
  "$venv/bin/python" - "$@" <<'PYTHON'
import json, subprocess, sys, urllib.request

def run(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout

def smi(query: str, fields: str) -> list[list[str]]:
    lines = run("nvidia-smi", f"--query-{query}={fields}", "--format=csv,noheader").splitlines()
    return [[cell.strip() for cell in line.split(",")] for line in lines if line.strip()]

gpus = {row[0]: (row[1], row[2]) for row in smi("gpu", "index,name,uuid") if len(row) == 3}
apps: dict[str, set[str]] = {}  # pid -> the GPUs it has a CUDA context on
for row in smi("compute-apps", "pid,gpu_uuid"):
    if len(row) == 2:
        apps.setdefault(row[0], set()).add(row[1])
failed = 0
for name, port, gpu in zip(*[iter(sys.argv[1:])] * 3):
    unit = f"comfyui@{name}.service"
    try:
        files = run("systemctl", "show", "-p", "EnvironmentFiles", "--value", unit).split()
        lines = open(files[0]).read().splitlines()
        env = dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))
        visible = env.get("CUDA_VISIBLE_DEVICES", "")
        pid = run("systemctl", "show", "-p", "MainPID", "--value", unit).strip()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/system_stats", timeout=10) as response:
            devices = json.load(response)["devices"]
        device = devices[0] if devices else {}
        problems = []
        if visible != gpu:
            problems.append(f"CUDA_VISIBLE_DEVICES is {visible!r}, not {gpu!r}")
        if device.get("type") != "cuda":
            problems.append(f"/system_stats reports device {device or 'none'}, not a CUDA one")
        expected, uuid = gpus.get(gpu, ("?", "?"))
        if expected not in str(device.get("name", "")):
            problems.append(f"/system_stats names {device.get('name')!r}, not GPU {gpu} ({expected})")
        where = apps.get(pid)
        if apps and where != {uuid}:
            problems.append(f"nvidia-smi shows its process {pid} on {sorted(where or []) or 'no GPU'}, not on {uuid}")
        seen = f"pid {pid} on {uuid}" if apps else "nvidia-smi lists no compute process (GPU checked by name only)"
        detail = (
            f"CUDA_VISIBLE_DEVICES={visible}, /system_stats: {device.get('name')} (index {device.get('index')}), {seen}"
        )
    except Exception as error:  # any failure to ask is the check's failure, named
        problems, detail = [f"{type(error).__name__}: {error}"], ""
    if problems:
        failed += 1
        print(f"FAIL 3 instance {name}: " + "; ".join(problems))
    else:
        print(f"PASS 3 instance {name}: {detail}")
sys.exit(1 if failed else 0)
PYTHON
}

converged=false
if (wants 3 || wants 4) && $built; then
  say "3: converging the instances ${instances[*]%%:*} (log: $workdir/instances.log)"
  if playbook instances; then
    converged=true
  else
    why instances
  fi
fi
if wants 3; then
  if $converged; then
    args=()
    for instance in "${instances[@]}"; do
      IFS=: read -r name port gpu <<<"$instance"
      args+=("$name" "$port" "$gpu")
    done
    output=$(check_instances "${args[@]}" 2>&1) && status=0 || status=$?
    before=$failed
    while IFS= read -r line; do
      case $line in
        PASS\ * | FAIL\ *) report "${line%% *}" "$(cut -d: -f1 <<<"${line#* }")" "${line#*: }" ;;
        *) printf '       %s\n' "$line" ;;
      esac
    done <<<"$output"
    ((status == 0 || failed > before)) || report FAIL "3 instances" "the check of the instances stopped (above)"
  elif $built; then
    report FAIL "3 instances" "the instances did not converge, or were not ready"
  else
    report FAIL "3 instances" "the environment $environment did not build"
  fi
  if ((${#gpu_index[@]} < 2)); then
    report SKIP "3 instance gpucheck-alone" "this machine has one GPU: an instance pinned alone to GPU 1 needs a second one"
  fi
fi

# ----------------------------------------------------------------------------- 4 unit

if wants 4; then
  if $converged; then
    # Character device majors whose driver name matches DeviceAllow=char-nvidia*.
    majors=$(awk '/^Character devices:/ {c = 1; next} /^$/ {c = 0} c && $2 ~ /^nvidia/ {print $1}' /proc/devices)
    problems=()
    [[ $(systemctl is-active nvidia-devnodes.service) == active ]] ||
      problems+=("nvidia-devnodes.service is $(systemctl is-active nvidia-devnodes.service) (journalctl -u nvidia-devnodes)")
    nodes=(/dev/nvidiactl /dev/nvidia-uvm)
    for instance in "${instances[@]}"; do nodes+=("/dev/nvidia${instance##*:}"); done
    for node in $(printf '%s\n' "${nodes[@]}" /dev/nvidia* | sort -u); do
      [[ -c $node ]] || {
        [[ -e $node ]] || problems+=("$node is missing")
        continue
      }
      major=$((16#$(stat -c %t "$node")))
      grep -qx "$major" <<<"$majors" || problems+=("$node (major $major) is no char-nvidia* device in /proc/devices")
    done
    if ((${#problems[@]})); then
      report FAIL "4 nvidia-devnodes" "$(IFS=';'; echo "${problems[*]}")"
    else
      report PASS "4 nvidia-devnodes" "active; every /dev/nvidia* node has a major named nvidia* in /proc/devices (${majors//$'\n'/ })"
    fi
    for instance in "${instances[@]}"; do
      name=${instance%%:*} unit=comfyui@${instance%%:*}.service
      policy=$(systemctl show -p DevicePolicy --value "$unit")
      allow=$(systemctl show -p DeviceAllow --value "$unit")
      requires=$(systemctl show -p Requires --value "$unit")
      exposure=$(systemd-analyze security --no-pager "$unit" 2>/dev/null |
        sed -n 's/.*Overall exposure level for .*: *\([0-9.]*\).*/\1/p' || true)
      problems=()
      [[ $policy == closed ]] || problems+=("DevicePolicy=$policy, not closed")
      [[ $allow == *char-nvidia* ]] || problems+=("DeviceAllow='$allow' lacks char-nvidia*")
      [[ $requires == *nvidia-devnodes.service* ]] || problems+=("it does not require nvidia-devnodes.service")
      if [[ -z $exposure ]]; then
        problems+=("systemd-analyze security gave no exposure level")
      elif ! awk -v e="$exposure" -v m="$max_exposure" 'BEGIN {exit !(e <= m)}'; then
        problems+=("exposure $exposure is above $max_exposure")
      fi
      if ((${#problems[@]})); then
        report FAIL "4 unit $unit" "$(IFS=';'; echo "${problems[*]}")"
      else
        report PASS "4 unit $unit" "DevicePolicy=closed, DeviceAllow=$allow, requires nvidia-devnodes.service, exposure $exposure (at most $max_exposure)"
      fi
    done
  else
    report FAIL "4 unit" "no instances to inspect: the environment or the instances did not converge (above)"
  fi
fi

# ----------------------------------------------------------------------------- cleanup, summary

if (wants 3 || wants 4) && $built; then
  if $keep; then
    say "--keep: the instances ${instances[*]%%:*} stay (remove them: ansible-playbook ... $workdir/cleanup.yml, as in --dry-run)"
  elif playbook cleanup; then
    say "removed the instances ${instances[*]%%:*} and their state (the environment stays in /opt/comfybake/envs/$environment)"
  else
    report FAIL "cleanup" "the instances could not be removed"
    why cleanup
  fi
fi

say "summary: $passed passed, $failed failed, $skipped skipped (logs in $workdir)"
((failed == 0))
