"""The lmms-eval bridge: a ``qig`` model for lmms-eval, the embedded world as an lmms-eval task, and a runner.

    >>> from qig.lmms import TASKS_DIR
    >>> sorted(p.name for p in TASKS_DIR.iterdir() if p.is_dir() and not p.name.startswith("_"))
    ['qig_world']

lmms-eval (``pip install 'qig[lmms-eval]'``, see docs/lmms-eval.md) finds the
``qig`` model through the ``lmms_eval.models`` entry point, which names
:func:`manifest`; the model (``qig.lmms.model.QigModel``) loads any qig folder
through ``qig.loading.load_model_and_processor``, so a weight-activation
folder runs with its activation quantizers, and answers as ``qig eval`` does.

    lmms-eval --model qig --model_args pretrained=out/awq-w4 --tasks vizwiz_vqa_val
    qig eval --model out/awq-w4 --tasks qig_world        # qig.lmms.run.run_tasks

Only this package imports lmms_eval, and only when it is used: the rest of
qig works without it.
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).parent / "tasks"  # lmms-eval task YAMLs shipped with qig (an lmms-eval include path)
EMBEDDED_TASK = "qig_world"
INSTALL_HINT = "pip install 'qig[lmms-eval]' && pip install --no-deps lmms-eval==0.7.3 (see docs/lmms-eval.md)"


def manifest():
    """The ``lmms_eval.models`` entry point: lmms-eval's model manifest for ``--model qig``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="qig", simple_class_path="qig.lmms.model.QigModel")
