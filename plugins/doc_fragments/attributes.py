# Copyright: comfybake contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""What each attribute of a comfybake module means; each module states its support and details."""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
attributes:
  check_mode:
    description: Can run in check mode and report what it would change without changing it.
  diff_mode:
    description: Reports what it changed, or would change in check mode, as a diff.
  idempotent:
    description: A second run with the same arguments changes nothing and reports no change.
"""
