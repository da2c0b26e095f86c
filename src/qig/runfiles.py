"""The names of a run folder's files, below both ``qig.runs`` (which reads and writes the folder) and ``qig.pipeline``.

    >>> RUN_FILES
    ('search.json', 'search.safetensors', 'report.json')

What each file holds: ``qig.runs``' module docstring.
"""

SEARCH_TENSORS = "search.safetensors"
SEARCH_JSON = "search.json"
REPORT_JSON = "report.json"
RUN_FILES = (SEARCH_JSON, SEARCH_TENSORS, REPORT_JSON)
RUN_SUBDIR = "qig"  # where an exported folder keeps the run files
