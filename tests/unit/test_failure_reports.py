"""A failed run of Ansible says why in one line: the task that ended it and its message."""

from __future__ import annotations

import subprocess
from pathlib import Path

from harness.tools import LOGS, failure_excerpt, failure_reason, save_log, venv_bin

PLAYBOOK = """
- hosts: localhost
  gather_facts: false
  tasks:
    - name: A failure that a rescue catches
      block:
        - name: Fail on purpose
          ansible.builtin.fail:
            msg: caught, not the reason
      rescue:
        - name: Carry on
          ansible.builtin.debug:
            msg: rescued
    - name: Fetch the model
      ansible.builtin.fail:
        msg: "unet/: cannot request http://:35787/big.safetensors: InvalidURL; check the url"
"""


def run(tmp_path: Path, ansible_env: dict[str, str], result_format: str) -> str:
    (tmp_path / "play.yml").write_text(PLAYBOOK)
    env = {**ansible_env, "ANSIBLE_CALLBACK_RESULT_FORMAT": result_format}
    done = subprocess.run([venv_bin("ansible-playbook"), "-i", "localhost,", "-c", "local", "play.yml"],
                          cwd=tmp_path, env=env, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_the_task_that_ended_the_run_is_the_reason(tmp_path: Path, ansible_env: dict[str, str]) -> None:
    for result_format in ("yaml", "json"):
        log = run(tmp_path, ansible_env, result_format)
        assert failure_reason(log) == (
            "TASK [Fetch the model]: unet/: cannot request http://:35787/big.safetensors: InvalidURL; check the url"
        ), result_format
        excerpt = failure_excerpt(log)
        assert excerpt.startswith("TASK [Fetch the model]") and "InvalidURL" in excerpt
        assert "caught, not the reason" not in excerpt


def test_packer_and_molecule_prefixes_are_read_through(tmp_path: Path, ansible_env: dict[str, str]) -> None:
    log = run(tmp_path, ansible_env, "yaml")
    packer = "\n".join(f"    comfybake.docker.comfybake: {line}" for line in log.splitlines())
    molecule = "\n".join(f"  \x1b[2m│\x1b[0m {line}" for line in log.splitlines())
    for wrapped in (packer, molecule):
        assert failure_reason(wrapped).startswith("TASK [Fetch the model]: unet/: cannot request")


def test_without_a_task_the_first_error_line_or_the_last_line(tmp_path: Path) -> None:
    assert failure_reason("starting\nError: Failed to prepare build\nmore") == "Error: Failed to prepare build"
    assert failure_reason("one\ntwo\n\n") == "two"
    assert failure_reason("x" * 900).endswith("...") and len(failure_reason("x" * 900)) == 600
    saved = save_log("packer bake/ci", "the whole log")
    assert saved.parent == LOGS and saved.name == "packer-bake-ci.log" and saved.read_text() == "the whole log"
    saved.unlink()
