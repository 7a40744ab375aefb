# Copyright: comfybake contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""The environment engine's error, and the redaction every message that names a URL goes through."""

from __future__ import annotations

from ..redaction import redact

__all__ = ["EnvError", "redact"]


class EnvError(Exception):
    """A failure the user can act on; the message names the item, the cause and the fix."""
