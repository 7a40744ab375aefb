# Copyright: comfybake contributors
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""Callback `fleet_summary`: one line per fleet host at the end of a rolling playbook."""

from __future__ import annotations

DOCUMENTATION = r"""
---
name: fleet_summary
type: aggregate
short_description: One line per fleet host at the end of a playbook that ran the fleet role
description:
  - At the end of every playbook that ran a task of the C(comfybake.core.fleet) role, prints one line
    per host of the plays that ran it, saying what happened to the host.
  - What happened comes, in this order, from the host being unreachable, from a task that failed on it
    (C(rolled back) when the instances role's readiness check rolled its environment back), from the
    C(comfybake_fleet) statistic the fleet role records per host with C(set_stats) (changed, unchanged,
    skipped, rolled back; C(stopped) for a host that left and never rejoined because another host of its
    batch failed), or from the host's changed tasks.
  - A host of the play that never ran because the rollout stopped (a batch failed beyond
    C(max_fail_percentage)) is reported as C(not reached), with the batch after which the rollout stopped.
  - Silent for playbooks that did not run the fleet role.
version_added: "0.1.0"
author: comfybake contributors (@comfybake)
requirements:
  - enable it in C(callbacks_enabled) (the repository's ansible.cfg does)
options:
  summary_file:
    description:
      - Also write the summary to this file as JSON (one object with C(playbook), C(stopped_after_batch)
        and C(hosts), a list of C(host), C(outcome), C(detail), C(batch) and C(failed)).
    type: path
    env:
      - name: COMFYBAKE_FLEET_SUMMARY
"""

import json
import os
from typing import Any

from ansible import context
from ansible.plugins.callback import CallbackBase
from ansible_collections.comfybake.core.plugins.module_utils.redaction import redact

FLEET_ROLE = "comfybake.core.fleet"
STAT_KEY = "comfybake_fleet"
ROLLED_BACK = "rolled back environment"


class CallbackModule(CallbackBase):  # type: ignore[misc] # ansible-core ships no type information
    """Collects who ran, in which batch, what failed, and prints the fleet summary at the end."""

    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "comfybake.core.fleet_summary"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self) -> None:
        super().__init__()
        self._playbook = ""
        self._play_uuid = ""
        self._batch = 0
        self._fleet_plays: dict[str, list[str]] = {}  # play uuid -> the play's hosts (its pattern, --limit applied)
        self._hosts: dict[str, dict[str, Any]] = {}  # host -> batches (play uuid -> batch), failure, unreachable
        self._play_hosts: list[str] = []
        self._inventory: Any = None

    # ------------------------------------------------------------------ collect

    def v2_playbook_on_start(self, playbook: Any) -> None:
        self._playbook = os.path.basename(getattr(playbook, "_file_name", "") or "")

    def v2_playbook_on_play_start(self, play: Any) -> None:
        """Sent once per batch of a serial play: the inventory is restricted to the batch now."""
        uuid = str(getattr(play, "_uuid", id(play)))
        if uuid != self._play_uuid:
            self._play_uuid, self._batch = uuid, 0
            self._play_hosts = []
        self._batch += 1
        manager = play.get_variable_manager()
        self._inventory = getattr(manager, "_inventory", None)
        if self._inventory is None:
            return
        pattern = play.hosts
        if not self._play_hosts:
            self._play_hosts = [host.name for host in self._inventory.get_hosts(pattern, ignore_restrictions=True)]
        for host in self._inventory.get_hosts(pattern):
            self._hosts.setdefault(host.name, {}).setdefault("batches", {})[uuid] = self._batch

    def v2_playbook_on_task_start(self, task: Any, is_conditional: bool) -> None:
        self._note_task(task)

    def v2_playbook_on_handler_task_start(self, task: Any) -> None:
        self._note_task(task)

    def _note_task(self, task: Any) -> None:
        role = getattr(task, "_role", None)
        name = role.get_name(include_role_fqcn=True) if role is not None else ""
        if name == FLEET_ROLE and self._play_uuid not in self._fleet_plays:
            self._fleet_plays[self._play_uuid] = list(self._play_hosts)

    def v2_runner_on_failed(self, result: Any, ignore_errors: bool = False) -> None:
        if ignore_errors:
            return
        failed = result._result
        # A loop says only "One or more items failed": the first failed item says what.
        for item in result._result.get("results") or []:
            if isinstance(item, dict) and item.get("failed"):
                failed = item
                break
        message = _message(failed)
        # A delegated task (a front's pool step) failed on another host: name it.
        delegated = failed.get("_ansible_delegated_vars") or result._result.get("_ansible_delegated_vars")
        if isinstance(delegated, dict):
            named = str(getattr(result._task, "delegate_to", None) or "")
            target = delegated.get("ansible_delegated_host") or ("" if "{" in named else named)
            target = target or delegated.get("ansible_host") or "the delegated host"
            message = f"on {target}: {message}"
        entry = self._hosts.setdefault(result._host.get_name(), {})
        entry["failure"] = {"task": result._task.get_name(), "message": message}

    def v2_runner_on_unreachable(self, result: Any) -> None:
        task = result._task
        if getattr(task, "ignore_unreachable", False) and getattr(task, "delegate_to", None):
            return  # a delegated host (a front a status report could not read): this host goes on
        entry = self._hosts.setdefault(result._host.get_name(), {})
        entry["unreachable"] = redact(str(result._result.get("msg") or "unreachable").strip())

    # ------------------------------------------------------------------ report

    def v2_playbook_on_stats(self, stats: Any) -> None:
        if not self._fleet_plays:
            return
        hosts: list[str] = []
        for play, play_hosts in self._fleet_plays.items():
            for host in play_hosts:
                entry = self._hosts.setdefault(host, {})
                if host not in hosts:
                    hosts.append(host)
                if play in entry.get("batches", {}) and "batch" not in entry:
                    entry["batch"] = entry["batches"][play]  # its batch in the (first) fleet play
        # The batch after which the rollout stopped: the last batch of a play that hosts of it never reached.
        unreached = [host for host in hosts if "batch" not in self._hosts[host]]
        batches = [self._hosts[host]["batch"] for host in hosts if "batch" in self._hosts[host]]
        stopped = max(batches) if unreached and batches else 0
        rows = [self._row(host, stats, stopped) for host in hosts]
        self._display.banner("FLEET SUMMARY")
        width = max(len(row["host"]) for row in rows)
        for row in rows:
            color = _color(row["outcome"])
            text = f"{row['host']:<{width}}  {row['outcome']}"
            self._display.display(text + (f": {row['detail']}" if row["detail"] else ""), color=color)
        path = self.get_option("summary_file")
        if path:
            document = {"playbook": self._playbook, "stopped_after_batch": stopped or None, "hosts": rows}
            with open(path, "w", encoding="utf-8") as handle:
                json.dump(document, handle, indent=2)
                handle.write("\n")

    def _row(self, host: str, stats: Any, stopped: int) -> dict[str, Any]:
        entry = self._hosts.get(host, {})
        recorded = (stats.custom.get(host) or {}).get(STAT_KEY) or {}
        if not isinstance(recorded, dict):  # another play's set_stats of the same name
            recorded = {}
        row: dict[str, Any] = {"host": host, "outcome": "", "detail": "", "batch": entry.get("batch"), "failed": False}
        if "batch" not in entry:
            row["outcome"] = "not reached"
            row["detail"] = f"rollout stopped after batch {stopped}" if stopped else "not in any batch"
        elif entry.get("unreachable") or stats.dark.get(host):
            row["outcome"] = "unreachable"
            row["failed"] = True
            row["detail"] = _first_line(entry.get("unreachable", ""))
        elif entry.get("failure") and stats.failures.get(host):
            failure = entry["failure"]
            rolled_back = [line.strip() for line in failure["message"].splitlines() if ROLLED_BACK in line]
            row["outcome"] = "rolled back" if rolled_back else "failed"
            row["failed"] = True
            detail = f"{failure['task']}: {_first_line(failure['message'])}"
            row["detail"] = detail + (f"; {rolled_back[0]}" if rolled_back else "")
        elif recorded.get("outcome") == "left":  # left, and the play ended before it rejoined
            row["outcome"] = "stopped"
            row["detail"] = f"{recorded.get('detail')}; the rollout stopped before it rejoined (change may be partial)"
            row["failed"] = True
        elif stopped and not recorded and entry.get("batch") == stopped:
            row["outcome"] = "stopped"
            row["detail"] = f"the rollout stopped during batch {stopped} before this host left the pools: unchanged"
        elif recorded:
            row["outcome"] = str(recorded.get("outcome") or "")
            row["detail"] = str(recorded.get("detail") or "")
        else:
            row["outcome"] = "changed" if stats.changed.get(host) else "unchanged"
        if row["outcome"] == "check":  # the role cannot tell in check mode; the tasks that would change can
            changes = int(stats.changed.get(host) or 0)
            row["outcome"] = "would change" if changes else "unchanged"
            row["detail"] += f"; {changes} task(s) would change" if changes else "; nothing to apply"
        elif context.CLIARGS.get("check") and row["outcome"] == "changed":
            row["outcome"] = "would change"
        return row


def _message(result: dict[str, Any]) -> str:
    # Printed and written to the summary file: no credentials of a URL (a mirror's user:token@).
    return redact(str(result.get("msg") or result.get("stderr") or "failed").strip())


def _first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""


def _color(outcome: str) -> str | None:
    if outcome in ("failed", "unreachable", "rolled back"):
        return "bright red"
    if outcome in ("skipped", "not reached"):
        return "bright purple"
    if outcome in ("changed", "would change"):
        return "yellow"
    return "green"
