"""Test-wide settings (never touch the network) and the shared saved tiny LLaVA folder."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny LLaVA with outlier channels, saved with its processor (a model folder for the CLI)."""
    from _tiny import processor, tiny_llava

    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_llava(outliers=True).save_pretrained(path)
    processor().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    """Another tiny LLaVA folder (no outlier channels): a second model whose results differ from model_dir's."""
    from _tiny import processor, tiny_llava

    path = tmp_path_factory.mktemp("tiny-other") / "model"
    tiny_llava(outliers=False).save_pretrained(path)
    processor().save_pretrained(path)
    return path
