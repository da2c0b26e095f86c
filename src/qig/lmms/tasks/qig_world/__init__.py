"""The embedded visual-QA world as an lmms-eval task (``qig_world.yaml``; its functions in ``utils.py``)."""
