# Copyright: comfybake contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""What a killed build leaves: a half-built release, and processes still running from it.

A release being built carries the marker file `.comfybake-building`: the pid of the run that
builds it, then one `session <id> <tool>` line for every command the build ran (the process
journal). A build that fails removes its release itself; one that is killed (SIGKILL, a lost
connection, a reboot) cannot. Every later run, before it does anything else and with the
environment locked (so no build of it is under way), stops what is still running in those
sessions and removes each marked release.
"""

from __future__ import annotations

import os
import shutil

from .process import journal_sessions, stop_sessions
from .releases import BUILDING_MARKER


def sweep(releases: str) -> list[str]:
    """Remove every release under `releases` still marked as being built; one note for each.

    Call it with the environment locked: a marked release then belongs to a run that is gone.
    """
    notes: list[str] = []
    try:
        entries = sorted(os.listdir(releases))
    except FileNotFoundError:
        return notes
    for entry in entries:
        release = os.path.join(releases, entry)
        marker = os.path.join(release, BUILDING_MARKER)
        if not os.path.isfile(marker):
            continue
        with open(marker, encoding="utf-8", errors="replace") as handle:
            started = handle.readline().strip() or "no record of its run"
        killed = stop_sessions(journal_sessions(marker), release)
        shutil.rmtree(release, ignore_errors=True)
        note = f"removed the half-built release {release} of a build that was killed ({started})"
        if killed:
            note += f"; stopped {len(killed)} process(es) it left running (pid {', '.join(map(str, killed))})"
        notes.append(note)
    return notes
