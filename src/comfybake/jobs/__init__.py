"""Serving jobs: a workflow posted to comfybake runs on a ready instance that can run it.

The pure parts, standard library only: `workflow` (load and check a workflow in ComfyUI's API
format), `placement` (which instance runs it: routing.json, readiness, /object_info's combo
lists, queue lengths) and `store` (the SQLite job store and its explicit state transitions).
The runner every front end shares, on aiohttp: `client` (one instance's ComfyUI API: upload,
queue, follow over /ws, stop, view), `outputs` (inline base64, or S3 with boto3) and `runner`
(a job from placement to its stored outputs, timeouts, cancel, drain, recovery).
docs/serving.md describes them.
"""
