"""Test-wide settings (never touch the network) and the shared saved tiny LLaVA folder."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402


def _saved_tiny(tmp_path_factory, name: str, outliers: bool):
    """A tiny LLaVA saved with its processor in a new folder (a model folder for the CLI)."""
    from _tiny import processor, tiny_llava

    path = tmp_path_factory.mktemp(name) / "model"
    tiny_llava(outliers=outliers).save_pretrained(path)
    processor().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny LLaVA with outlier channels."""
    return _saved_tiny(tmp_path_factory, "tiny", outliers=True)


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    """Another tiny LLaVA (no outlier channels): a second model whose results differ from model_dir's."""
    return _saved_tiny(tmp_path_factory, "tiny-other", outliers=False)
