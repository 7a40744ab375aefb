# Copyright: comfybake contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Build ComfyUI environments as releases: pinned ComfyUI, pinned custom nodes, one venv.

Private to comfybake: the `comfybake.core.environment` module runs it on managed hosts and the
`comfybake` package imports it on the controller (through a link), so it needs only the
standard library, `git` and `uv`, and runs on Python 3.10+.

An environment lives in `<root>`:

    <root>/current -> releases/<id>         the live release, switched atomically
    <root>/releases/<id>/ComfyUI/            ComfyUI checkout, custom_nodes/<name>/ checkouts
    <root>/releases/<id>/venv/               the release's own venv
    <root>/releases/<id>/comfybake.lock.json what was built (read by the status tooling)
    <root>/releases/<id>/requirements.lock.txt  the resolved set with hashes (uv pip compile)
    <root>/releases/<id>/writable/           the seeds of the paths node packs write (writable.py)

`<id>` is derived from every input that shapes the build (the fingerprint), so a run whose
inputs match the live release's lock changes nothing. A release is built next to the live
one, checked (one resolution of all requirements with torch held as a constraint, `uv pip
check`, and ComfyUI's `--quick-test-for-ci` import gate) and only then made live. A release
still being built carries the marker file `.comfybake-building` and is removed when its
build fails, or by the next run when its build was killed.

One concept per module: `spec` (what an environment is made of: the keys a user writes, read
and validated into a Spec), `process` (running git, uv and python), `gitcache` (bare
repositories and pinned checkouts), `requirements` (what each part asks for, what one
resolution gave), `imports` (what a node that failed to import most likely lacks), `writable`
(the paths node packs write in their own folder, a copy per process), `releases` (the
releases on a host: live, in use, the switch of `current`), `leftovers` (what a killed build
left: its half-built release and processes), `builder` (the build of a release); ComfyUI's log
is read by `..comfyui_log`, which readiness shares.
"""

from __future__ import annotations

from .builder import Builder, Result
from .errors import EnvError
from .spec import ENVIRONMENT_KEYS, Source, Spec, environment_spec, node_name_from_repo

__all__ = [
    "ENVIRONMENT_KEYS",
    "Builder",
    "EnvError",
    "Result",
    "Source",
    "Spec",
    "environment_spec",
    "node_name_from_repo",
]
