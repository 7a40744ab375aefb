#!/usr/bin/python
# Copyright: comfybake contributors
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""Ansible module: bring a model store in line with a whole manifest in one call."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: models
short_description: Fetch, verify and record the models of a manifest in a ComfyUI model store
description:
  - Brings a model store in line with a whole manifest in one call (a loop over files costs
    about 0.4 s per item in Ansible).
  - Sources are C(https://) URLs, C(http://) only when allowed, C(file://) paths,
    Hugging Face C(hf://<owner>/<repo>/<path>@<revision>) and its C(resolve) URLs, and Civitai
    C(civitai://<modelVersionId>).
  - Every file is verified by SHA-256, computed while it streams. Without a C(sha256) in the
    entry, the hash the source publishes is used (Hugging Face C(X-Linked-Etag) for LFS files,
    the Civitai model-version API); without either the entry fails unless it sets
    C(allow_unverified).
  - A verified file is recorded in C(<store>/.comfybake/verified.json) with its size, mtime and
    inode; while those are unchanged a later run trusts the record and opens nothing
    (O(verify=recorded)). O(verify=full) re-hashes every file. A file of an C(allow_unverified)
    entry fetched without a known hash is recorded as unverified (C(verified) false in
    C(verified.json)) and returned with C(verified=false); its ranges are stitched only when
    each carries the probe's strong validator and the asked C(Content-Range), else it is
    fetched in one stream.
  - Downloads go to a hidden staging file next to the destination and are renamed into place
    only after verification; interrupted downloads resume with validators; large files are
    fetched over several ranged connections when the server allows it; 408, 429 and 5xx are
    retried with backoff honouring C(Retry-After), never 401, 403 or 404; free space is checked
    before the first byte.
  - Tokens are sent only to the host they belong to, never across a redirect to another host,
    and never over an https to http downgrade.
  - A failing entry does not stop the others; the task fails at the end and lists every
    failure. An invalid manifest fails before any network access.
  - With O(prune), files in the store that no entry references are removed after fetching, with
    their records and stale partial downloads; never a O(protected) glob nor a file a process
    has open. With O(budget), the store's usage plus what the run downloads must fit before the
    first byte.
version_added: "0.1.0"
author: comfybake contributors (@comfybake)
extends_documentation_fragment:
  - comfybake.core.attributes
  - comfybake.core.fetch_options
requirements:
  - python >= 3.10
  - requests
  - picklescan 1.0.5, or the host's C(comfybake) command that carries it, for pickle-based files that
    O(allow_pickle) or O(models[].allow_pickle) allows
attributes:
  check_mode:
    support: full
    details: Probes sources with HEAD (and the Civitai API) and writes nothing.
  diff_mode:
    support: full
    details: Shows per changed entry the file before (absent or its hash) and after.
  idempotent:
    support: full
    details: A converged store reports no change and transfers no bytes.
notes:
  - The staging files are hidden and have no model extension, so ComfyUI never lists a partial file.
  - Two runs against one store (two plays, or the module and the boot-time CLI) take a lock per file;
    the second finds the file verified and transfers nothing.
  - Pickle-based files (C(.ckpt), C(.pt), C(.pth), C(.pkl), and pickle bytes in any file or archive member)
    are refused unless allowed; an allowed one is scanned with picklescan in its staging file, in process
    when the host's Python has the pinned picklescan, else by running C(/usr/local/bin/comfybake models scan)
    (root-owned, not group- or world-writable; never one on PATH), and fails on a dangerous import or any
    import outside picklescan's safe list and comfybake's short allow list. Without either scanner it fails;
    it is never installed unscanned.
seealso:
  - module: ansible.builtin.get_url
"""

EXAMPLES = r"""
- name: Fetch the models of the manifest
  comfybake.core.models:
    store: /srv/comfybake/models
    group: comfybake
    models:
      - url: hf://Comfy-Org/stable-diffusion-v1-5-archive/v1-5-pruned-emaonly-fp16.safetensors@main
        dest: checkpoints/v1-5-pruned-emaonly-fp16.safetensors
      - url: civitai://128713
        dest: loras/
      - url: https://example.org/antelopev2.zip
        dest: insightface/models/antelopev2/
        extract: true
        sha256: 8e182f14fc6e80b3bfa375b33eb6cff7ee05d8ef7633e738d1c89021dcf0c5c5
        files: [glintr100.onnx, scrfd_10g_bnkps.onnx]
  environment:
    HF_TOKEN: "{{ vault_hf_token }}"

- name: Fetch from the site mirror first, re-hashing everything already there
  comfybake.core.models:
    store: /srv/comfybake/models
    models: "{{ (lookup('ansible.builtin.file', 'models.lock.yml') | from_yaml).models }}"
    mirrors: [https://models.internal.example/store]
    verify: full

- name: Fetch the manifest and remove what it no longer lists, keeping our own checkpoints
  comfybake.core.models:
    store: /srv/comfybake/models
    models: "{{ comfyui_models }}"
    prune: true
    protected: [checkpoints/ours-*]
    budget: 500GiB

- name: Remove a model
  comfybake.core.models:
    store: /srv/comfybake/models
    models:
      - url: hf://org/repo/old.safetensors@main
        dest: checkpoints/old.safetensors
        state: absent
"""

RETURN = r"""
models:
  description: One item per manifest entry, in manifest order.
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: The entry's dest as written in the manifest.
      type: str
      sample: checkpoints/model.safetensors
    source:
      description: The entry's url without query string or credentials.
      type: str
    action:
      description:
        - What happened. C(downloaded), C(extracted), C(present), C(removed), C(absent) or C(failed);
          in check mode C(would_download), C(would_extract) or C(would_remove), or C(unprobed) on a
          host that lacks the requests library until the comfyui role installs it.
      type: str
      sample: downloaded
    changed:
      description: Whether this entry changed the store.
      type: bool
    path:
      description: Absolute path of the file (or extracted folder).
      type: str
      sample: /srv/comfybake/models/checkpoints/model.safetensors
    sha256:
      description: Verified SHA-256 (of the archive, for extracted entries).
      type: str
    size:
      description: Size in bytes.
      type: int
    bytes:
      description: Bytes transferred by this run (0 when the file was already verified).
      type: int
    seconds:
      description: Time spent on the entry.
      type: float
    files:
      description: Files of an extracted folder.
      type: list
      elements: str
    msg:
      description: Why the entry failed.
      type: str
      returned: when failed
    replaced:
      description: SHA-256 of the file that was (or in check mode would be) replaced.
      type: str
      returned: when a wrong file was replaced
    verified:
      description:
        - Whether the file was checked against a known SHA-256 (the manifest's or the source's).
          C(false) for an C(allow_unverified) entry fetched without one; its record in
          C(verified.json) says so until the manifest gives a C(sha256).
      type: bool
bytes:
  description: Total bytes transferred.
  returned: always
  type: int
  sample: 0
pruned:
  description: What O(prune) removed (in check mode, would remove) and what it kept.
  returned: when O(prune) is true
  type: dict
  contains:
    removed:
      description:
        - Each removed file, relative to the store, with its size and why (C(unreferenced), C(stale partial download)).
      type: list
      elements: dict
    kept:
      description:
        - Each file prune left, and why (protected, open by a running process, download in progress, or
          that it cannot tell which files processes have open, when not run as root).
      type: list
      elements: dict
    freed:
      description: Bytes removed.
      type: int
    usage:
      description: Bytes the store held before pruning.
      type: int
    skipped:
      description: Why prune removed nothing at all (an entry of the run failed, so what it uses is not known).
      type: str
      returned: when prune was skipped
"""

import os
import traceback
from typing import Any

from ansible.module_utils.basic import AnsibleModule, env_fallback, missing_required_lib
from ansible_collections.comfybake.core.plugins.module_utils.fetch import (
    HAS_REQUESTS,
    REQUESTS_IMPORT_ERROR,
    SETTINGS,
    Fetcher,
    FetchError,
    Options,
    argument_spec,
    human,
    parse_manifest,
    prunable,
    prune,
)

ARGUMENT_SPEC = argument_spec(env_fallback)


def _entries(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop the keys the argument spec filled with defaults so the engine sees the manifest as written."""
    return [{k: v for k, v in item.items() if v is not None} for item in models]


def _diff(results: list[dict[str, Any]], pruned: dict[str, Any] | None) -> dict[str, str]:
    before: list[str] = []
    after: list[str] = []
    for item in (pruned or {}).get("removed", []):
        before.append(f"{item['path']}: present ({human(item['bytes'])})\n")
        after.append(f"{item['path']}: absent (pruned, {item['why']})\n")
    for item in results:
        if not item.get("changed"):
            continue
        where = item.get("path") or item["name"]
        if item["action"] in ("removed", "would_remove"):
            before.append(f"{where}: present\n")
            after.append(f"{where}: absent\n")
        else:
            previous = f"sha256 {item['replaced']}" if item.get("replaced") else "absent"
            before.append(f"{where}: {previous}\n")
            size = f" ({human(item['size'])})" if item.get("size") is not None else ""
            after.append(f"{where}: sha256 {item.get('sha256') or 'unknown'}{size}\n")
    return {"before": "".join(before), "after": "".join(after)}


def main() -> None:
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    params = module.params
    result: dict[str, Any] = {"changed": False, "models": [], "bytes": 0}
    if not HAS_REQUESTS:
        if module.check_mode:
            # A fresh host in check mode: the comfyui role would install python3-requests first.
            module.warn("requests is not installed yet, so check mode cannot probe the sources")
            result["models"] = [
                {"name": item["dest"], "action": "unprobed", "changed": True} for item in params["models"]
            ]
            module.exit_json(**{**result, "changed": bool(params["models"])})
        module.fail_json(msg=missing_required_lib("requests"), exception=str(REQUESTS_IMPORT_ERROR), **result)

    try:
        options = Options.from_params({name: params[name] for name in SETTINGS}, check_mode=module.check_mode)
        entries = parse_manifest(_entries(params["models"]), options)
        if not os.path.isdir(options.store):
            raise FetchError(f"model store {options.store} does not exist; create it first (the comfyui role does)")
        fetcher = Fetcher(options)
        fetcher.prunable = prunable(options, entries, ["models"])
        report = fetcher.run(entries)
        pruned = None
        if options.prune:
            pruned = prune(
                options, entries, apply=not module.check_mode, report=report, store=fetcher.store, sources=["models"]
            )
    except FetchError as error:
        module.fail_json(msg=str(error), **result)
    except Exception as error:  # noqa: BLE001 - unexpected: report with a traceback
        module.fail_json(msg=f"unexpected error: {error}", exception=traceback.format_exc(), **result)

    result["models"] = [item.as_dict() for item in report.results]
    result["changed"] = report.changed
    result["bytes"] = sum(item.bytes for item in report.results)
    if pruned is not None:
        result["pruned"] = {k: v for k, v in pruned.as_dict().items() if k not in ("dry_run", "budget")}
        if pruned.skipped:
            module.warn(pruned.skipped)
        for pattern in pruned.unmatched:
            module.warn(f"protected glob {pattern!r} matches nothing in the store")
        result["changed"] = result["changed"] or pruned.changed
    if module._diff:
        result["diff"] = _diff(result["models"], result.get("pruned"))
    for warning in report.warnings:
        module.warn(warning)
    if report.failed:
        failures = "\n".join(item.msg or item.name for item in report.failed)
        count = len(report.failed)
        module.fail_json(msg=f"{count} of {len(report.results)} model(s) failed:\n{failures}", **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
