#!/usr/bin/env python3
"""Write the documentation that is rendered from a table in the code.

plugins/doc_fragments/fetch_options.py (the options of comfybake.core.models) is rendered from
the settings table in plugins/module_utils/fetch/options.py. Edit the table, then run this;
tests/collection/test_collection.py fails while the two differ. `--check` exits 1 instead of
writing when the file is out of date.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "collections"))

from ansible_collections.comfybake.core.plugins.module_utils.fetch import render_documentation  # noqa: E402

FRAGMENT = ROOT / "plugins" / "doc_fragments" / "fetch_options.py"
TEMPLATE = '''# Copyright: comfybake contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
# Written by scripts/render-docs.py from plugins/module_utils/fetch/options.py; edit the table there.
"""The options of comfybake.core.models: the manifest and the settings of a fetch run."""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
{options}"""
'''


def rendered() -> str:
    return TEMPLATE.format(options=render_documentation())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is out of date; write nothing")
    args = parser.parse_args()
    text = rendered()
    current = FRAGMENT.read_text(encoding="utf-8") if FRAGMENT.exists() else ""
    if current == text:
        print(f"render-docs: {FRAGMENT.relative_to(ROOT)} is up to date")
        return 0
    if args.check:
        print(f"render-docs: {FRAGMENT.relative_to(ROOT)} is out of date; run scripts/render-docs.py", file=sys.stderr)
        return 1
    FRAGMENT.write_text(text, encoding="utf-8")
    print(f"render-docs: wrote {FRAGMENT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
