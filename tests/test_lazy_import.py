"""``import qig``, ``qig --help`` and ``qig models`` do not import torch (public names and commands load lazily)."""

import subprocess
import sys


def test_import_qig_does_not_import_torch():
    code = "import sys, qig; assert 'torch' not in sys.modules, 'import qig imported torch'; qig.__version__"
    subprocess.run([sys.executable, "-c", code], check=True)


def _cli_imports_torch(*argv: str) -> bool:
    code = (
        "import sys\n"
        "from qig.cli import main\n"
        f"code = main({list(argv)!r})\n"
        "assert code == 0, code\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1] == "True"


def test_qig_models_does_not_import_torch():
    assert not _cli_imports_torch("models")
    assert not _cli_imports_torch("models", "--json")


def test_qig_help_does_not_import_torch():
    code = (
        "import sys\nfrom qig.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip().splitlines()[-1] == "False"
    assert "quantize" in out and "export" in out


def test_a_command_that_needs_torch_gets_it():
    """The check above can fail: a command whose flags come from the configs does import torch."""
    code = "import sys\nfrom qig.cli import build_parser\nbuild_parser(['quantize'])\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "True"
