"""Run `comfybake exporter` as its own process and read what it exposes (tests/exporter)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def write_host(config_root: Path, records: list[dict[str, Any]], **host: Any) -> Path:
    """`<config root>/instances.json` as the comfyui_instances role writes it."""
    config_root.mkdir(parents=True, exist_ok=True)
    plain = [{key: value for key, value in record.items() if key != "double"} for record in records]
    (config_root / "instances.json").write_text(json.dumps({"format": 1, "instances": plain, **host}))
    return config_root


def exporter(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`comfybake exporter ...` as its own process (a generous limit: a hang fails, not hangs, the test)."""
    return subprocess.run(
        [sys.executable, "-m", "comfybake", "exporter", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


def samples(text: str) -> Samples:
    """Every sample of a scrape: (name, sorted labels) to value."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))
