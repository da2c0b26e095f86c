"""Shared fixture of the command tests: a saved tiny LLaVA folder."""

import pytest
from _tiny import processor, tiny_llava


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_llava(outliers=True).save_pretrained(path)
    processor().save_pretrained(path)
    return path
