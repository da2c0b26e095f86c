"""lmms-eval task configs shipped with qig (``qig.lmms.TASKS_DIR``, an lmms-eval ``--include_path``)."""
