"""The stable C surface (csrc/include/msld.h) used from a small C program, plain and under
AddressSanitizer + UndefinedBehaviorSanitizer."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("cc") is None or shutil.which("c++") is None, reason="no C/C++ compiler")
@pytest.mark.parametrize("sanitize", ["0", "1"], ids=["plain", "asan+ubsan"])
def test_c_program(tmp_path, sanitize):
    env = dict(os.environ, SANITIZE=sanitize, BUILD_DIR=str(tmp_path))
    r = subprocess.run(["bash", str(ROOT / "scripts" / "build_c_test.sh")], capture_output=True, text=True, env=env,
                       cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"(\d+) passed, (\d+) failed", r.stdout)
    assert m and int(m.group(1)) >= 25 and m.group(2) == "0", r.stdout
    assert "runtime error" not in r.stderr and "AddressSanitizer" not in r.stderr, r.stderr
