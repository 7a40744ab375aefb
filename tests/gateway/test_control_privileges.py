"""The control API's privilege on systemd hosts: the polkit rule the comfyui_instances role writes
for the job service's account, rendered by Ansible from a layout and judged by a real polkitd.

systemd asks polkit `org.freedesktop.systemd1.manage-units` with the details `unit` and `verb`
whenever an unprivileged account's systemctl starts, stops, restarts or resets a unit. Here a
private system bus (dbus-daemon) and polkitd (which reads /etc/polkit-1/rules.d, so the rule is
put there for the test's length and removed after) answer `pkcheck` as they answer systemd, for a
process of the account the rule names (`nobody` stands in for comfybake-jobs) and of another one.
In container images the same right is supervisord's control socket, opened to the job service's
group only where it runs (the rendered supervisord.conf).
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.double import stop_process
from harness.gateway import tool, wait_until
from harness.tools import ROOT, venv_bin

RULES = Path("/etc/polkit-1/rules.d")
ACCOUNT, OTHER = "nobody", "daemon"
LAYOUT = [{"name": "a", "unit": "comfyui@a.service"}, {"name": "b", "unit": "comfyui@b.service"}]
MANAGE = "org.freedesktop.systemd1.manage-units"


def environment() -> dict[str, str]:
    """ansible-playbook's environment: the repository's configuration (the collection's filters)."""
    env = dict(os.environ)
    env.update(ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")  # fmt: skip
    return env


def render(tmp_path: Path, ansible_env: dict[str, str]) -> str:
    """The role's rule for LAYOUT and ACCOUNT, as the template task writes it."""
    play = [
        {
            "hosts": "localhost",
            "gather_facts": False,
            "vars": {"_comfyui_jobs_account": ACCOUNT, "_comfyui_instances_layout": LAYOUT},
            "tasks": [
                {
                    "name": "Render the rule",
                    "ansible.builtin.template": {
                        "src": str(ROOT / "roles" / "comfyui_instances" / "templates" / "comfybake-jobs.rules.j2"),
                        "dest": str(tmp_path / "rule.js"),
                    },
                }
            ],
        }
    ]
    (tmp_path / "play.yml").write_text(json.dumps(play))
    done = subprocess.run([venv_bin("ansible-playbook"), "-i", "localhost,", "-c", "local", "-e",
                           f"ansible_python_interpreter={sys.executable}", "play.yml"],
                          cwd=tmp_path, env=ansible_env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return (tmp_path / "rule.js").read_text()


class Polkit:
    """A private system bus and polkitd on it, and a process of each account to ask about."""

    def __init__(self, folder: Path) -> None:
        # polkitd changes to its own account before it connects: the bus's folder must be open to
        # it (pytest's are root's only).
        self.bus_dir = Path(tempfile.mkdtemp(prefix="cbpolkit-"))
        self.bus_dir.chmod(0o755)
        self.bus = f"unix:path={self.bus_dir / 'bus'}"
        self.env = {"PATH": "/usr/bin:/bin", "DBUS_SYSTEM_BUS_ADDRESS": self.bus}
        self.processes: list[subprocess.Popen[bytes]] = []
        self.log = folder / "polkit.log"
        self.subjects: dict[str, int] = {}

    def start(self) -> None:
        with self.log.open("ab") as sink:
            self.processes.append(subprocess.Popen(
                [tool("dbus-daemon", "dbus-daemon"), "--config-file=/usr/share/dbus-1/system.conf", "--nofork",
                 "--nopidfile", f"--address={self.bus}"], stdout=sink, stderr=subprocess.STDOUT, env=self.env,
            ))  # fmt: skip
            wait_until(lambda: Path(self.bus.removeprefix("unix:path=")).exists(), 10, "the bus did not open")
            # polkitd starts as root and changes to its own account, as under systemd.
            self.processes.append(subprocess.Popen(
                ["/usr/lib/polkit-1/polkitd", "--no-debug"], stdout=sink, stderr=subprocess.STDOUT, env=self.env
            ))  # fmt: skip
        for account in (ACCOUNT, OTHER):
            sleeper = subprocess.Popen([tool("setpriv", "util-linux"), "--reuid", account, "--regid", "nogroup",
                                        "--clear-groups", "sleep", "600"])  # fmt: skip
            self.processes.append(sleeper)
            self.subjects[account] = sleeper.pid
        wait_until(lambda: self.check(MANAGE, OTHER, {}) in (0, 2, 3), 20, "polkitd did not answer")

    def check(self, action: str, account: str, details: dict[str, str]) -> int:
        """pkcheck's exit status (0: authorized, 2: not, 3: needs authentication) for a process of
        `account`, asked as systemd asks: by root, with details."""
        argv = [tool("pkcheck", "polkitd"), "--action-id", action, "--process", str(self.subjects[account])]
        for name, value in details.items():
            argv += ["--detail", name, value]
        return subprocess.run(argv, env=self.env, capture_output=True, check=False).returncode

    def stop(self) -> None:
        for process in reversed(self.processes):
            stop_process(process)
        shutil.rmtree(self.bus_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def polkit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Polkit]:
    if os.geteuid() != 0:
        pytest.fail("the polkit test starts polkitd, which needs root (as the tests run in CI)")
    tool("pkcheck", "polkitd")
    scratch = tmp_path_factory.mktemp("polkit")
    rule = RULES / f"99-comfybake-test-{os.getpid()}.rules"
    rule.write_text(render(scratch, environment()))
    running = Polkit(scratch)
    try:
        running.start()
        yield running
    finally:
        running.stop()
        rule.unlink()
    assert not rule.exists()


@pytest.mark.parametrize("unit", ["comfyui@a.service", "comfyui@b.service"])
@pytest.mark.parametrize("verb", ["start", "stop", "restart", "reset-failed"])
def test_the_job_service_may_start_stop_and_restart_the_instance_units(polkit: Polkit, unit: str, verb: str) -> None:
    assert polkit.check(MANAGE, ACCOUNT, {"unit": unit, "verb": verb}) == 0


@pytest.mark.parametrize(
    ("account", "unit", "verb"),
    [
        (ACCOUNT, "comfyui@c.service", "start"),  # not an instance of the layout
        (ACCOUNT, "comfybake-gateway.service", "stop"),
        (ACCOUNT, "ssh.service", "restart"),
        (ACCOUNT, "comfyui@a.service", "reload"),
        (ACCOUNT, "comfyui@a.service", "kill"),
        (ACCOUNT, "comfyui-retry@a.timer", "start"),  # only stopped, as `instances stop` does
        (OTHER, "comfyui@a.service", "start"),  # another account
    ],
)
def test_nothing_else_is_allowed(polkit: Polkit, account: str, unit: str, verb: str) -> None:
    assert polkit.check(MANAGE, account, {"unit": unit, "verb": verb}) != 0


def test_the_retry_timers_may_be_stopped_and_no_other_action_is_granted(polkit: Polkit) -> None:
    assert polkit.check(MANAGE, ACCOUNT, {"unit": "comfyui-retry@b.timer", "verb": "stop"}) == 0
    for action in ("org.freedesktop.systemd1.manage-unit-files", "org.freedesktop.systemd1.reload-daemon"):
        assert polkit.check(action, ACCOUNT, {"unit": "comfyui@a.service", "verb": "start"}) != 0, action
    assert polkit.check(MANAGE, ACCOUNT, {}) != 0  # no unit named: nothing granted


def test_the_rule_names_each_unit_of_the_layout(polkit: Polkit) -> None:
    text = (RULES / f"99-comfybake-test-{os.getpid()}.rules").read_text()
    assert '["comfyui@a.service", "comfyui@b.service"]' in text
    assert '["comfyui-retry@a.timer", "comfyui-retry@b.timer"]' in text
    assert f'subject.user !== "{ACCOUNT}"' in text


def test_in_images_supervisords_socket_opens_to_the_job_service_only_where_it_runs(tmp_path: Path) -> None:
    """supervisord's control socket: root's only, or root:comfybake-jobs 0770 with the job service."""
    files = [ROOT / "roles" / role / folder / "main.yml" for role, folder in
             (("comfyui", "defaults"), ("comfyui", "vars"), ("comfyui_instances", "defaults"),
              ("comfyui_instances", "vars"))]  # fmt: skip
    given = {"_comfyui_instances_layout": [], "comfyui_exporter_enabled": False, "comfyui_gateway_enabled": False}
    cases = {"off": {}, "jobs": {"comfyui_jobs_enabled": True},
             "jobs_no_control": {"comfyui_jobs_enabled": True, "comfyui_instances_jobs_control": False}}  # fmt: skip
    template = str(ROOT / "roles" / "comfyui_instances" / "templates" / "supervisord.conf.j2")
    tasks = [
        {"name": f"Render {case}", "ansible.builtin.template": {"src": template, "dest": str(tmp_path / case)},
         "vars": {**given, **extra}}
        for case, extra in cases.items()
    ]  # fmt: skip
    play = [{"hosts": "localhost", "gather_facts": False, "vars_files": [str(f) for f in files], "tasks": tasks}]
    (tmp_path / "play.yml").write_text(json.dumps(play))
    done = subprocess.run([venv_bin("ansible-playbook"), "-i", "localhost,", "-c", "local", "-e",
                           f"ansible_python_interpreter={sys.executable}", "play.yml"],
                          cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    sockets = {}
    for case in cases:
        parser = configparser.ConfigParser(interpolation=None)
        parser.read_string((tmp_path / case).read_text())
        sockets[case] = (parser["unix_http_server"]["chmod"], parser["unix_http_server"]["chown"])
    assert sockets == {
        "off": ("0700", "root:root"),
        "jobs": ("0770", "root:comfybake-jobs"),
        "jobs_no_control": ("0700", "root:root"),
    }
