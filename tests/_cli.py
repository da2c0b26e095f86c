"""Running ``qig`` in-process from tests."""

from qig.cli import main


def run_cli(*argv) -> int:
    """Run ``qig`` with the arguments as strings; returns the exit code."""
    return main([str(a) for a in argv])
