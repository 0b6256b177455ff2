"""`import lmforge` and the CLI's top-level help must not pay for torch."""

from __future__ import annotations

import subprocess
import sys


def test_import_lmforge_does_not_import_torch():
    code = "import sys, lmforge, lmforge.config, lmforge.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
