"""``import qig`` does not import torch (the public names are imported lazily; see qig's module docstring)."""

import subprocess
import sys


def test_import_qig_does_not_import_torch():
    code = "import sys, qig; assert 'torch' not in sys.modules, 'import qig imported torch'; qig.__version__"
    subprocess.run([sys.executable, "-c", code], check=True)
