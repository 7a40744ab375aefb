"""Serving jobs: a workflow posted to comfybake runs on a ready instance that can run it.

The pure parts, standard library only: `workflow` (load and check a workflow in ComfyUI's API
format), `placement` (which instance runs it: routing.json, readiness, /object_info's combo
lists, queue lengths) and `store` (the SQLite job store and its explicit state transitions).
docs/serving.md describes them.
"""
