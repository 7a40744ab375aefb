"""The `comfybake.core.instance_layout` filter: a valid layout expands fully, down to what each process
gets; every problem is named at once; `instance_quote` writes only checked values, per kind of file."""

from __future__ import annotations

import argparse
from typing import Any

import pytest
from ansible.errors import AnsibleFilterError
from ansible_collections.comfybake.core.plugins.filter.instances import (
    COMFYUI_OPTIONS,
    CORS_FLAG,
    MANAGED_FLAGS,
    REFUSED_FLAGS,
    instance_layout,
    instance_quote,
    instance_route,
    memory_limits,
    resolve_option,
)

ENVIRONMENTS = {"comm": {"required_node_classes": ["ComfybakeEcho"]}, "aua-sp": {}}
SETTINGS: dict[str, Any] = {
    "listen": "127.0.0.1",
    "state_root": "/var/lib/comfybake",
    "cache_root": "/var/cache/comfybake",
    "config_root": "/etc/comfybake",
    "code_root": "/opt/comfybake",
    "extra_args": [],
    "allowed_clients": [],
    "reserved_ports": [],
    "busy_ports": {},
    "log_dir": "",
}
A = {"name": "a", "environment": "comm", "port": 8188, "gpus": [0]}
B = {"name": "b", "environment": "comm", "port": 8189, "gpus": [1], "share_gpus": True}
C = {"name": "c", "environment": "aua-sp", "port": 8190, "gpus": [1], "share_gpus": True}


def layout(instances: list[dict[str, Any]], **settings: Any) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = instance_layout(instances, ENVIRONMENTS, {**SETTINGS, **settings})
    return result


def problems(instances: list[dict[str, Any]], **settings: Any) -> str:
    with pytest.raises(AnsibleFilterError) as raised:
        layout(instances, **settings)
    return str(raised.value.message)


def test_a_valid_layout_expands_every_instance() -> None:
    a, b, c = layout([A, B, C | {"extra_args": ["--reserve-vram", "1"], "description": "SP"}])
    assert a["args"] == [
        "--listen", "127.0.0.1", "--port", "8188", "--disable-auto-launch",
        "--extra-model-paths-config", "/etc/comfybake/envs/comm/extra_model_paths.yaml",
        "--user-directory", "/var/lib/comfybake/instances/a/user",
        "--input-directory", "/var/lib/comfybake/instances/a/input",
        "--output-directory", "/var/lib/comfybake/instances/a/output",
        "--temp-directory", "/var/cache/comfybake/instances/a",
        "--database-url", "sqlite:////var/lib/comfybake/instances/a/comfyui.db",
    ]  # fmt: skip
    assert (a["unit"], a["user"], a["gpus"]) == ("comfyui@a.service", "comfyui-a", ["0"])
    assert a["url"] == "http://127.0.0.1:8188"
    assert a["required_node_classes"] == ["ComfybakeEcho"] and c["required_node_classes"] == []
    assert a["env_file"] == "/etc/comfybake/instances/a.env" and a["code_dir"] == "/opt/comfybake/instances/a"
    assert c["args"][-2:] == ["--reserve-vram", "1"] and c["description"] == "SP"
    assert [item["enabled"] for item in (a, b, c)] == [True, True, True]
    assert b["share_gpus"] and not a["share_gpus"] and a["log_file"] == ""


OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "PYTHONUNBUFFERED": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
}


def test_the_record_declares_the_environment_command_line_and_limits_of_the_process() -> None:
    (a,) = layout([A])
    assert a["env"] == {
        "COMFYUI_INSTANCE": "a",
        "COMFYUI_ENVIRONMENT": "comm",
        "COMFYUI_PORT": "8188",
        "CUDA_VISIBLE_DEVICES": "0",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "HOME": "/var/lib/comfybake/instances/a",
        "XDG_CACHE_HOME": "/var/cache/comfybake/instances/a",
        "TRITON_CACHE_DIR": "/var/cache/comfybake/instances/a/triton",
        "TORCHINDUCTOR_CACHE_DIR": "/var/cache/comfybake/instances/a/inductor",
        **OFFLINE,
    }
    assert a["argv"] == [
        "/opt/comfybake/instances/a/venv/bin/python", "-s", "/opt/comfybake/instances/a/ComfyUI/main.py",
        *a["args"],
    ]  # fmt: skip
    assert a["working_dir"] == "/var/lib/comfybake/instances/a"
    # No memory setting: `auto`, the whole host (less the 10% reserve) for its one instance.
    assert a["limits"] == {"MemoryHigh": "72%", "MemoryMax": "81%", "TasksMax": "4096", "LimitNOFILE": "65536"}


def test_a_cpu_instance_gets_no_gpu_and_the_role_wide_memory_limits_unless_it_sets_its_own() -> None:
    cpu, big = layout(
        [
            {"name": "cpu", "environment": "aua-sp", "port": 8200, "gpus": [], "extra_args": ["--reserve-vram", "5%"]},
            {"name": "big", "environment": "comm", "port": 8201, "gpus": ["GPU-8f6e1c2a-0000"], "memory_max": "48G"},
        ],
        state_root="/var/lib/cb",
        code_root="/srv/code",
        memory_high="80%",
        memory_max="90%",
    )
    assert cpu["env"] == {
        "COMFYUI_INSTANCE": "cpu",
        "COMFYUI_ENVIRONMENT": "aua-sp",
        "COMFYUI_PORT": "8200",
        "CUDA_VISIBLE_DEVICES": "",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "HOME": "/var/lib/cb/instances/cpu",
        "XDG_CACHE_HOME": "/var/cache/comfybake/instances/cpu",
        "TRITON_CACHE_DIR": "/var/cache/comfybake/instances/cpu/triton",
        "TORCHINDUCTOR_CACHE_DIR": "/var/cache/comfybake/instances/cpu/inductor",
        **OFFLINE,
    }
    assert cpu["argv"] == [
        "/srv/code/instances/cpu/venv/bin/python", "-s", "/srv/code/instances/cpu/ComfyUI/main.py",
        "--listen", "127.0.0.1", "--port", "8200", "--disable-auto-launch",
        "--extra-model-paths-config", "/etc/comfybake/envs/aua-sp/extra_model_paths.yaml",
        "--user-directory", "/var/lib/cb/instances/cpu/user",
        "--input-directory", "/var/lib/cb/instances/cpu/input",
        "--output-directory", "/var/lib/cb/instances/cpu/output",
        "--temp-directory", "/var/cache/comfybake/instances/cpu",
        "--database-url", "sqlite:////var/lib/cb/instances/cpu/comfyui.db",
        "--cpu", "--reserve-vram", "5%",
    ]  # fmt: skip
    assert cpu["limits"] == {"MemoryHigh": "80%", "MemoryMax": "90%", "TasksMax": "4096", "LimitNOFILE": "65536"}
    assert big["env"]["CUDA_VISIBLE_DEVICES"] == "GPU-8f6e1c2a-0000"
    assert big["limits"] == {"MemoryHigh": "80%", "MemoryMax": "48G", "TasksMax": "4096", "LimitNOFILE": "65536"}


@pytest.mark.parametrize(
    ("count", "reserve", "expected"),
    [
        (1, None, {"MemoryHigh": "72%", "MemoryMax": "81%"}),  # 80% and 90% of the 90% the reserve leaves
        (2, None, {"MemoryHigh": "36%", "MemoryMax": "40%"}),  # 40.5% rounds down: the sum stays below 100%
        (3, "10", {"MemoryHigh": "24%", "MemoryMax": "27%"}),  # the role hands its settings in as strings
        (4, 20, {"MemoryHigh": "16%", "MemoryMax": "18%"}),
        (8, 0, {"MemoryHigh": "10%", "MemoryMax": "11%"}),
        (200, None, {"MemoryHigh": "1%", "MemoryMax": "1%"}),  # never 0%, which systemd reads as no memory
        (0, None, {}),
    ],
)
def test_auto_memory_limits_share_what_the_reserve_leaves_evenly(
    count: int, reserve: Any, expected: dict[str, str]
) -> None:
    assert memory_limits(count, reserve) == expected


def test_auto_memory_limits_follow_the_instance_count_and_each_setting_overrides_them() -> None:
    a, b, c = layout([A, B | {"memory_max": "infinity"}, C | {"memory_high": "auto", "memory_max": "12G"}])
    assert (a["limits"]["MemoryHigh"], a["limits"]["MemoryMax"]) == ("24%", "27%")
    assert (b["limits"]["MemoryHigh"], b["limits"]["MemoryMax"]) == ("24%", "infinity")
    assert (c["limits"]["MemoryHigh"], c["limits"]["MemoryMax"]) == ("24%", "12G")
    (a,) = layout([A], memory_high="infinity", memory_max="auto", memory_reserve="30")
    assert (a["limits"]["MemoryHigh"], a["limits"]["MemoryMax"]) == ("infinity", "63%")
    (a,) = layout([A], memory_high="", memory_max="")  # empty is the default, auto
    assert (a["limits"]["MemoryHigh"], a["limits"]["MemoryMax"]) == ("72%", "81%")


@pytest.mark.parametrize("reserve", ["95", "-1", "10%", "4G", "ten"])
def test_a_memory_reserve_outside_0_to_90_percent_is_refused(reserve: str) -> None:
    assert f"comfyui_instances_memory_reserve {reserve!r} must be a whole percent" in problems(
        [A], memory_reserve=reserve
    )


@pytest.mark.parametrize(
    ("instances", "settings", "expected"),
    [
        ([A | {"description": "SP\nExecStartPre=/bin/sh"}], {}, "'SP\\nExecStartPre=/bin/sh' must be one line"),
        ([A | {"extra_args": ["--x", "$(id)"]}], {}, "instance 'a': extra_args value '$(id)' has a space, quote"),
        ([A | {"extra_args": ['--x="1"']}], {}, "extra_args value '--x=\"1\"' has a space, quote or shell character"),
        ([A | {"environment": "my env"}], {}, "instance 'a': environment 'my env' is not a name of letters, digits"),
        ([A], {"state_root": "/var/lib/my state"}, "comfyui_state_root '/var/lib/my state' must be an absolute path"),
        ([A], {"code_root": "opt/comfybake"}, "comfyui_code_root 'opt/comfybake' must be an absolute path"),
        ([A], {"log_dir": "/var/log/x\ny"}, "comfyui_instances_log_dir '/var/log/x\\ny' must be an absolute path"),
        ([A | {"listen": "fe80::1%eth0\nX=1"}], {"allowed_clients": ["fe80::/10"]}, "'fe80::1%eth0\\nX=1' has a"),
        ([A], {"memory_max": "48 G"}, "comfyui_instances_memory_max '48 G' is not a size"),
        ([A], {"allowed_clients": ["10.0.0.0/8 1.2.3.4"]}, "allowed_clients: '10.0.0.0/8 1.2.3.4' must be one address"),
    ],
)  # fmt: skip
def test_a_string_that_a_file_could_misread_is_refused(
    instances: list[dict[str, Any]], settings: dict[str, Any], expected: str
) -> None:
    environments = {**ENVIRONMENTS, "my env": {}}
    with pytest.raises(AnsibleFilterError) as raised:
        instance_layout(instances, environments, {**SETTINGS, **settings})
    assert expected in str(raised.value.message)


# A trailing line break passed `re.match(...$)`, and a zone or C1 control passed the other
# checks; each would add a line to the environment file or the unit (ExecStartPre=+ runs as root).
@pytest.mark.parametrize(
    ("instances", "settings", "expected"),
    [
        ([A | {"name": "a\n"}], {}, "instance 'a\\n': the name must be 1 to 23"),
        ([A | {"gpus": ["0\n"]}], {}, "instance 'a': GPU '0\\n' is not an index"),
        ([A | {"memory_max": "48G\n"}], {}, "instance 'a': memory_max '48G\\n' is not a size"),
        ([A | {"environment": "comm\n"}], {}, "environment 'comm\\n' is not a name of letters"),
        ([A | {"description": "SP\n"}], {}, "description 'SP\\n' must be one line of text"),
        ([A | {"description": "SP\x85HF_HUB_OFFLINE=0"}], {}, "must be one line of text"),
        ([A | {"description": "SP\u2028LD_PRELOAD=/tmp/x.so"}], {}, "must be one line of text"),
        ([A | {"description": ["SP"]}], {}, "description ['SP'] must be one line of text"),
        ([A | {"listen": "127.0.0.1\n"}], {}, "listen '127.0.0.1\\n' has a line break or another control"),
        ([A | {"extra_args": ["--fast\n", "ExecStartPre=+/usr/bin/touch", "/root/pwned"]}], {},
         "extra_args value '--fast\\n' holds a line break"),
        ([A | {"extra_args": "--reserve-vram 2"}], {}, "instance 'a': extra_args must be a list of strings"),
        ([A], {"extra_args": "--reserve-vram 2"}, "comfyui_instances_extra_args '--reserve-vram 2' must be a list"),
        ([A], {"allowed_clients": ["::1%x\nExecStartPre=+touch pwned"]}, "allowed_clients: '::1%x\\nExecStartPre"),
        ([A], {"allowed_clients": ["10.0.0.0/8\n"]}, "must be one address or CIDR range, without spaces"),
        ([A], {"allowed_clients": ["fe80::1%eth0"]}, "'fe80::1%eth0' has an IPv6 zone"),
        ([A], {"allowed_clients": "10.0.0.0/8"}, "comfyui_instances_allowed_clients '10.0.0.0/8' must be a list"),
        ([A], {"model_store": "/srv/m\nExecStartPre=+touch pwned"}, "comfyui_model_store '/srv/m\\nExec"),
        ([A], {"model_store": "/srv/a /"}, "comfyui_model_store '/srv/a /' must be an absolute path"),
        ([A], {"config_root": "/etc/comfybake\n"}, "comfyui_config_root '/etc/comfybake\\n' must be an absolute"),
        ([A], {"memory_high": "80%\n"}, "comfyui_instances_memory_high '80%\\n' is not a size"),
    ],
)  # fmt: skip
def test_a_line_break_or_control_character_is_refused_in_every_string(
    instances: list[dict[str, Any]], settings: dict[str, Any], expected: str
) -> None:
    environments = {**ENVIRONMENTS, "comm\n": {}}
    with pytest.raises(AnsibleFilterError) as raised:
        instance_layout(instances, environments, {**SETTINGS, **settings})
    assert expected in str(raised.value.message)


def test_a_valid_model_store_and_allowed_clients_pass() -> None:
    (lan,) = layout([A | {"listen": "10.0.0.5"}], allowed_clients=["10.0.0.0/24", "2001:db8::/32", "192.0.2.7"])
    assert lan["listen"] == "10.0.0.5"
    assert layout([A], model_store="/srv/comfybake/models")[0]["name"] == "a"


# ComfyUI's parser (argparse) reads any unambiguous prefix of an option as the option.
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--liste", "10.0.0.5"], "extra_args sets --listen (as --liste: ComfyUI takes a prefix of an option"),
        (["--liste=10.0.0.5"], "extra_args sets --listen (as --liste:"),
        (["--li"], "extra_args sets --listen (as --li:"),
        (["--por", "9999"], "extra_args sets --port (as --por:"),
        (["--por=9999"], "extra_args sets --port (as --por:"),
        (["--output-dir", "/srv/comfybake/models/loras"], "sets --output-directory (as --output-dir:"),
        (["--cuda-dev", "1"], "extra_args sets --cuda-device (as --cuda-dev:"),
        (["--cuda-dev=1"], "extra_args sets --cuda-device (as --cuda-dev:"),
        (["--cu", "1"], "extra_args sets --cuda-device (as --cu:"),
        (["--base-dir", "/tmp"], "sets --base-directory (as --base-dir:"),
        (["--user-dir=/tmp"], "sets --user-directory (as --user-dir:"),
        (["--input-dir", "/tmp"], "sets --input-directory (as --input-dir:"),
        (["--temp-dir", "/tmp"], "sets --temp-directory (as --temp-dir:"),
        (["--database", "sqlite:///tmp/x.db"], "sets --database-url (as --database:"),
        (["--extra-model", "/tmp/x.yaml"], "sets --extra-model-paths-config (as --extra-model:"),
        (["--models-dir", "/tmp"], "sets --models-directory (as --models-dir:"),
        (["--auto-l"], "sets --auto-launch (as --auto-l:"),
        (["--quick-test"], "sets --quick-test-for-ci (as --quick-test:"),
        (["--windows-standalone-build"], "sets --windows-standalone-build, which comfybake sets from nothing"),
        (["--enable-man"], "sets --enable-manager (as --enable-man:"),
        (["--enable-manager-legacy-ui"], "sets --enable-manager-legacy-ui, which comfybake refuses: it implies"),
    ],
)  # fmt: skip
def test_a_managed_flag_is_refused_under_any_prefix_argparse_takes_for_it(args: list[str], expected: str) -> None:
    assert expected in problems([A | {"extra_args": args}])
    assert expected.replace("'a'", "'b'") in problems([A], extra_args=args)  # the role-wide arguments too


def test_prefixes_of_other_options_and_single_dash_words_pass() -> None:
    args = ["--preview-m", "auto", "--reserve-v=2", "--fast", "--disable-smart", "--cpu-vae", "-listen"]
    (a,) = layout([A | {"extra_args": args}])
    assert a["args"][-len(args) :] == args
    assert resolve_option("-liste") == [] and resolve_option("10.0.0.5") == [] and resolve_option("--") == []
    assert resolve_option("--cpu") == ["--cpu"]  # given in full: not a prefix of --cpu-vae
    assert resolve_option("--cuda") == ["--cuda-device", "--cuda-malloc"]


@pytest.mark.parametrize(
    "args",
    [
        ["--enable-cors-header"],
        ["--enable-cors-header", "https://app.example"],
        ["--enable-cors-header=https://app.example"],
        ["--enable-cor"],
        ["--enable-c=https://app.example"],
    ],
)
def test_cors_is_refused_unless_the_operator_allows_it(args: list[str]) -> None:
    message = problems([A | {"extra_args": args}])
    assert "--enable-cors-header" in message and "turns off ComfyUI's same-origin check" in message
    assert "set comfyui_instances_allow_cors: true" in message
    assert "same-origin" in problems([A | {"extra_args": args}], allow_cors=False)
    (a,) = layout([A | {"extra_args": args}], allow_cors=True)
    assert a["args"][-len(args) :] == args


def test_the_option_table_holds_every_flag_comfybake_checks() -> None:
    assert len(set(COMFYUI_OPTIONS)) == len(COMFYUI_OPTIONS)
    assert {*MANAGED_FLAGS, *REFUSED_FLAGS, CORS_FLAG} <= set(COMFYUI_OPTIONS)
    assert all(option.startswith("--") for option in COMFYUI_OPTIONS)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's own is NoReturn
        raise ValueError(message)


def _argparse_reads(word: str) -> list[str] | None:
    """The options a parser with ComfyUI's options sets from `word` ([] for none), None when it refuses it."""
    parser = _Parser(add_help=False)
    for option in COMFYUI_OPTIONS:
        parser.add_argument(option, nargs="?", const="", default=argparse.SUPPRESS)
    try:
        namespace, _ = parser.parse_known_args([word])
    except ValueError:
        return None
    return [option for option in COMFYUI_OPTIONS if option[2:].replace("-", "_") in vars(namespace)]


CHECKED = [*MANAGED_FLAGS, *REFUSED_FLAGS, CORS_FLAG]
WORDS = sorted(
    {flag[:end] for flag in CHECKED for end in range(3, len(flag) + 1)}
    | {f"{flag[:end]}=x" for flag in CHECKED for end in (4, len(flag) - 1)}
    | {"--preview-m", "--reserve-v", "--fast=x", "-liste", "-h", "--", "--x", "-1", "10.0.0.5"}
)


@pytest.mark.parametrize("word", WORDS)
def test_options_resolve_as_argparse_reads_them(word: str) -> None:
    read = _argparse_reads(word)
    if read is None:  # argparse refuses an ambiguous prefix
        assert len(resolve_option(word)) > 1
    else:
        assert resolve_option(word) == read


def test_each_file_gets_its_own_quoting_of_a_checked_value() -> None:
    assert instance_quote("--reserve-vram=5%", "plain") == "--reserve-vram=5%"
    assert instance_quote("--reserve-vram=5%", "systemd") == "--reserve-vram=5%%"
    assert instance_quote("--reserve-vram=5%", "supervisor") == "--reserve-vram=5%%"
    assert instance_quote("0,1", "supervisor_env") == '"0,1"'
    assert instance_quote("", "supervisor_env") == '""' and instance_quote("", "plain") == ""
    assert instance_quote(8188, "plain") == "8188"


@pytest.mark.parametrize(
    ("value", "target", "expected"),
    [
        ("a b", "plain", "'a b' cannot be written safely into a plain file"),
        ('x"', "supervisor_env", "cannot be written safely into a supervisor_env file"),
        ("x\nExecStart=/bin/sh", "systemd", "cannot be written safely into a systemd file"),
        ("x\n", "plain", "cannot be written safely into a plain file"),
        ("/srv/models\n", "systemd", "cannot be written safely into a systemd file"),
        ("$HOME", "systemd", "cannot be written safely"),
        ("", "systemd", "an empty word would vanish from a systemd file"),
        ("x", "shell", "target 'shell' is not one of plain, systemd, supervisor, supervisor_env"),
    ],
)
def test_quoting_refuses_what_it_cannot_write_safely(value: str, target: str, expected: str) -> None:
    with pytest.raises(AnsibleFilterError, match=r"^instance_quote - ") as raised:
        instance_quote(value, target)
    assert expected in str(raised.value.message)


def test_cpu_instances_log_files_and_common_args() -> None:
    (cpu,) = layout(
        [{"name": "cpu", "environment": "comm", "port": 8200, "gpus": [], "enabled": False}],
        extra_args=["--preview-method", "auto"],
        log_dir="/var/log/comfybake",
    )
    assert "--cpu" in cpu["args"] and cpu["args"][-2:] == ["--preview-method", "auto"]
    assert cpu["log_file"] == "/var/log/comfybake/comfyui_instance_cpu.log"
    assert cpu["enabled"] is False


def test_ipv6_loopback_and_allowed_clients() -> None:
    (six,) = layout([A | {"listen": "::1"}])
    assert six["url"] == "http://[::1]:8188"
    (lan,) = layout([A | {"listen": "10.0.0.5"}], allowed_clients=["10.0.0.0/24"])
    assert lan["args"][:2] == ["--listen", "10.0.0.5"]


def test_a_container_listens_on_every_address_of_its_namespace_only_when_opted_in() -> None:
    opted_in = {"manager": "supervisor", "container_listen_all": True}
    (inside,) = layout([A | {"listen": "0.0.0.0"}], **opted_in)  # noqa: S104 - only published ports
    assert inside["args"][:2] == ["--listen", "0.0.0.0"]  # noqa: S104
    assert inside["url"] == "http://127.0.0.1:8188"  # the routing file's URL, from inside the container
    assert "binds every address" in problems([A | {"listen": "0.0.0.0"}], manager="systemd")  # noqa: S104
    assert "binds every address" in problems([A | {"listen": ""}], **opted_in)  # a bare --listen
    # Without the opt-in a container image keeps loopback: ComfyUI has no authentication.
    refused = problems([A | {"listen": "::"}], manager="supervisor")
    assert "listen '::' binds every address of the container" in refused
    assert "comfyui_instances_container_listen_all: true" in refused
    (loopback,) = layout([A], manager="supervisor")
    assert loopback["args"][:2] == ["--listen", "127.0.0.1"]


@pytest.mark.parametrize(
    ("instances", "settings", "expected"),
    [
        ([A, B | {"port": 8188}], {}, "instances 'a' and 'b' both use port 8188; give each its own port"),
        ([A, A | {"port": 8191}], {}, "instance 'a' is defined more than once"),
        ([A, B | {"gpus": [0]}], {}, "instances 'a' and 'b' both use GPU 0; set share_gpus: true on both"),
        ([B, C | {"share_gpus": False}], {}, "instances 'b' and 'c' both use GPU 1"),
        ([A | {"environment": "nope"}], {}, "'nope' is not defined in comfyui_environments (defined: aua-sp"),
        ([A | {"port": 80}], {}, "instance 'a': port 80 must be a number from 1024 to 65535"),
        ([A | {"port": "8188"}], {}, "instance 'a': port '8188' must be a number"),
        ([A], {"reserved_ports": [8188]}, "instance 'a': port 8188 is in comfyui_instances_reserved_ports"),
        ([A], {"busy_ports": {"8188": "nginx (pid 7)"}}, "port 8188 is already used on this host by nginx (pid 7)"),
        ([A | {"listen": "0.0.0.0"}], {}, "instance 'a': listen '0.0.0.0' binds every address"),  # noqa: S104
        ([A | {"listen": "10.0.0.5"}], {}, "instance 'a': listen 10.0.0.5 is reachable from other hosts"),
        ([A | {"listen": "my-host"}], {}, "instance 'a': listen 'my-host' is not one IP address"),
        ([A | {"name": "A_1"}], {}, "instance 'A_1': the name must be 1 to 23 lower-case letters"),
        ([A | {"prot": 1}], {}, "instance 'a': unknown key 'prot'"),
        ([A | {"gpus": None}], {}, "instance 'a': set gpus"),
        ([A | {"gpus": [0, 0]}], {}, "instance 'a': GPU 0 is listed twice"),
        ([A | {"gpus": ["gpu0"]}], {}, "instance 'a': GPU 'gpu0' is not an index"),
        ([A | {"extra_args": ["--port", "9000"]}], {}, "'a': extra_args sets --port, which comfybake sets from port"),
        ([A | {"extra_args": ["--listen=0.0.0.0"]}], {}, "extra_args sets --listen, which comfybake sets from listen"),
        ([A | {"extra_args": ["--enable-manager"]}], {}, "extra_args sets --enable-manager, which comfybake refuses"),
        ([A | {"extra_args": ["--preview-method auto"]}], {}, "extra_args value '--preview-method auto' has a space"),
        ([A | {"memory_max": "lots"}], {}, "instance 'a': memory_max 'lots' is not a size"),
        ([A | {"enabled": "yes"}], {}, "instance 'a': enabled must be true or false, not 'yes'"),
        ([A | {"log_file": True}], {}, "instance 'a': log_file is true but comfyui_instances_log_dir is empty"),
        ([A | {"required_models": ["x.safetensors"]}], {}, "instance 'a': required_models must map a model folder"),
        ([{"environment": "comm", "port": 8188, "gpus": []}], {}, "comfyui_instances[0]: the name must be"),
    ],
)  # fmt: skip
def test_each_problem_names_the_instance_and_the_fix(
    instances: list[dict[str, Any]], settings: dict[str, Any], expected: str
) -> None:
    assert expected in problems(instances, **settings)


def test_every_problem_is_reported_at_once() -> None:
    message = problems([A, B | {"port": 8188}, C | {"environment": "nope", "port": 70000}])
    assert message.startswith("comfyui_instances is invalid:\n- ")
    assert "instances 'a' and 'b' both use port 8188" in message
    assert "instance 'c': environment 'nope'" in message
    assert "instance 'c': port 70000" in message
    assert message.count("\n- ") == 3


def test_a_duplicate_name_is_one_problem() -> None:
    assert problems([A, A | {"port": 8191}, A | {"port": 8192}]) == (
        "comfyui_instances is invalid:\n- instance 'a' is defined more than once; instance names must be unique"
    )


def test_sharing_needs_the_flag_on_both_and_is_allowed_with_it() -> None:
    assert [item["gpus"] for item in layout([B, C])] == [["1"], ["1"]]
    uuid = "GPU-8f6e1c2a-0000-4d3e-9c1b-1234567890ab"
    assert layout([A | {"gpus": [uuid]}])[0]["gpus"] == [uuid]


def test_the_whole_input_must_be_a_list_of_mappings() -> None:
    assert layout([]) == [] and layout(None) == []  # type: ignore[arg-type]
    with pytest.raises(AnsibleFilterError, match="comfyui_instances must be a list of instances"):
        layout({"a": A})  # type: ignore[arg-type]


def test_route_lists_node_classes_found_or_the_required_ones() -> None:
    a, c = layout([A, C])
    route = instance_route(a, {"a": ["ZNode", "ComfybakeEcho"]}, {"a": "https://gpu1:9188/"})
    assert route == {
        "name": "a", "environment": "comm", "url": "http://127.0.0.1:8188", "public_url": "https://gpu1:9188/",
        "port": 8188, "gpus": ["0"],
        "enabled": True, "description": "", "required_node_classes": ["ComfybakeEcho"],
        "node_classes": ["ComfybakeEcho", "ZNode"],
    }  # fmt: skip
    assert instance_route(a, {})["node_classes"] == ["ComfybakeEcho"]
    assert instance_route(a, {})["public_url"] == ""  # no gateway
    assert instance_route(c, {})["node_classes"] == []
