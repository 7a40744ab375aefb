# Copyright: comfybake contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
# Written by scripts/render-docs.py from plugins/module_utils/fetch/options.py; edit the table there.
"""The options of comfybake.core.models: the manifest and the settings of a fetch run."""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  models:
    description:
      - "The manifest, or the C(models) list of a lock written by C(comfybake models lock)."
    type: list
    required: true
    elements: dict
    suboptions:
      url:
        description:
          - "Where the file comes from."
        type: str
        required: true
      dest:
        description:
          - "Path relative to O(store). Ending in C(/) it names a folder (such as C(loras/)) and the file name comes
            from the source (Civitai's file name, the Hub path, the URL, or a sanitised C(Content-Disposition));
            otherwise it is the exact file path."
          - "Absolute paths, C(..), backslashes and hidden components are refused, and so is any destination that
            resolves outside the store through a symlink."
        type: str
        required: true
      sha256:
        description:
          - "Expected SHA-256 (64 hex digits)."
        type: str
      size:
        description:
          - "Expected size in bytes."
        type: int
      extract:
        description:
          - "Unpack a zip or tar archive into the folder O(models[].dest). A single wrapping folder named like the
            destination is dropped (C(antelopev2.zip) holding C(antelopev2/*))."
          - "Archives with members that escape the folder, links, devices or FIFOs, or that expand past
            O(archive_max_bytes) or O(archive_max_members), are refused whole."
        type: bool
        default: false
      files:
        description:
          - "Files the extracted folder must contain."
        type: list
        elements: str
      state:
        description:
          - "C(absent) removes the file (or extracted folder) and its record."
        type: str
        choices: [present, absent]
        default: "present"
      auth:
        description:
          - "Which token the entry may use. Inferred from the URL (C(hf://) and the Hub host use O(hf_token),
            C(civitai://) and the Civitai host use O(civitai_token)); naming a token for any other host is an
            error."
        type: str
        choices: [hf, civitai, none]
      allow_http:
        description:
          - "Permit a plain http URL or redirect for this entry."
        type: bool
        default: false
      allow_unverified:
        description:
          - "Accept a file whose SHA-256 neither the entry nor the source gives (recorded on first fetch)."
        type: bool
        default: false
      allow_pickle:
        description:
          - "Permit a pickle-based file for this entry (or pickle-based members of its archive); see
            O(allow_pickle). It is scanned before it is moved into place."
        type: bool
        default: false
      extracted_size:
        description:
          - "Bytes an archive (O(models[].extract)) takes once unpacked, for O(budget); twice the archive's size
            when unset."
        type: int
  store:
    description:
      - "Root of the model store (C(<folder>/<file>))."
    type: path
    required: true
  parallel:
    description:
      - "Files fetched at the same time."
    type: int
    default: 4
  connections:
    description:
      - "Ranged connections per file of 64 MiB or more, when the server supports ranges."
    type: int
    default: 4
  verify:
    description:
      - "C(recorded) trusts a recorded verification while size, mtime and inode are unchanged."
      - "C(full) re-hashes every file in the store that the manifest names."
    type: str
    choices: [recorded, full]
    default: "recorded"
  hf_token:
    description:
      - "Hugging Face token, sent only to O(hf_endpoint)."
      - "Falls back to E(HF_TOKEN)."
    type: str
  civitai_token:
    description:
      - "Civitai token, sent only to O(civitai_endpoint)."
      - "Falls back to E(CIVITAI_TOKEN)."
    type: str
  hf_endpoint:
    description:
      - "The Hugging Face Hub (or a compatible mirror of its API)."
      - "Falls back to E(HF_ENDPOINT)."
    type: str
    default: "https://huggingface.co"
  civitai_endpoint:
    description:
      - "The Civitai site."
      - "Falls back to E(CIVITAI_ENDPOINT)."
    type: str
    default: "https://civitai.com"
  mirrors:
    description:
      - "Base URLs tried before the origin, as C(<mirror>/<dest path>) (C(https://), C(http://) or C(file://))."
      - "Used only for entries whose SHA-256 is known; no token is ever sent to a mirror."
    type: list
    elements: str
    default: []
  allow_http:
    description:
      - "Permit plain http for every entry (for sites with an internal http mirror)."
    type: bool
    default: false
  ca_bundle:
    description:
      - "CA bundle used to verify TLS (a proxy's CA); the system bundle otherwise."
    type: path
  owner:
    description:
      - "Owner of the files and created folders (name or uid); the running user otherwise."
    type: str
  group:
    description:
      - "Group of the files and created folders (name or gid), usually the service group."
    type: str
  mode:
    description:
      - "Mode of the model files, an octal string."
    type: raw
    default: "0640"
  directory_mode:
    description:
      - "Mode of the folders it creates, an octal string."
    type: raw
    default: "2750"
  retries:
    description:
      - "Retries of a request after 408, 429, 5xx or a broken connection."
    type: int
    default: 5
  timeout:
    description:
      - "Connect and read timeout in seconds."
    type: float
    default: 30.0
  archive_max_bytes:
    description:
      - "Largest total uncompressed size of an archive."
    type: int
    default: 34359738368
  archive_max_members:
    description:
      - "Largest number of members in an archive."
    type: int
    default: 10000
  allow_pickle:
    description:
      - "Permit pickle-based files (C(.ckpt), C(.pt), C(.pth), C(.pkl), and any file or archive member whose bytes
        are a pickle stream or a PyTorch zip) for every entry. Loading them can run code, so each is scanned with
        picklescan before it is moved into place and refused when it imports anything dangerous."
    type: bool
    default: false
  budget:
    description:
      - "Most bytes the store may hold, such as C(200GiB) (powers of 1024) or C(2TB) (powers of 1000); none by
        default."
      - "Before the first byte the run checks that the store's usage plus everything it is about to download (an
        archive counts its size plus its extracted size: O(models[].extracted_size), else twice the archive's) fits,
        and fails naming both numbers otherwise. C(comfybake models prune --budget) removes unreferenced files,
        least recently used first, until the store fits."
    type: str
  protected:
    description:
      - "Globs of paths in the store (such as C(checkpoints/mine-*)) that pruning never removes; one that names a
        folder (C(loras/keep/)) protects everything under it. Every models file's globs and the flags add up."
    type: list
    elements: str
    default: []
  prune:
    description:
      - "After fetching, remove the files in the store that no entry of the manifest references (and their records
        and stale partial downloads), except O(protected) globs and files a process has open."
    type: bool
    default: false
"""
