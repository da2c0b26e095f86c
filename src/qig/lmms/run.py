"""``qig eval --tasks``: lmms-eval's ``simple_evaluate`` with the qig model, failing loudly.

    >>> from qig.lmms.run import run_tasks
    >>> results = run_tasks(["qig_world"], "out/awq-w4", limit=100)  # doctest: +SKIP
    >>> results["results"]["qig_world"]["exact_match,none"]  # doctest: +SKIP
    0.98

The embedded task ``qig_world`` needs no setup: its data (``qig world eval``'s
data.json and images) is written to a temporary folder for the run. Other
names are lmms-eval's own tasks (the paper's: ``vizwiz_vqa_val``,
``mmmu_val``, ``chartqa``, ``ai2d``, ``scienceqa_img``), whose datasets
lmms-eval fetches from the Hugging Face hub as usual.

lmms-eval's command line exits 0 when an evaluation raises; here any failure
(an unknown task, an error inside lmms-eval, a task without results) is a
one-line ``QigError``.
"""

from __future__ import annotations

import difflib
import os
import tempfile
from pathlib import Path

from qig.embedded import world
from qig.errors import QigError
from qig.lmms import EMBEDDED_TASK, INSTALL_HINT, TASKS_DIR


def run_tasks(
    tasks: list[str],
    model_dir: str | os.PathLike | None = None,
    device: str = "cpu",
    batch_size: int = 64,
    limit: int | None = None,
    seed: int = world.DEFAULT_EVAL_SEED,
    n: int = 1000,
    revision: str | None = None,
    model_offload: str = "none",
) -> dict:
    """lmms-eval's results dict (``results``, ``samples``, ...) for ``tasks`` scored with the qig model.

    seed, n: the embedded task's split (as ``qig eval --seed/--n``); limit:
    lmms-eval's, the first N documents of every task. model_offload: where the
    decoder layers are read from (``qig.evaluate.load_for_eval``).
    """
    try:
        from lmms_eval.evaluator import simple_evaluate
        from lmms_eval.tasks import TaskManager
    except ImportError as exc:
        raise QigError(f"lmms-eval is not installed or does not import ({exc}); {INSTALL_HINT}") from exc
    from qig.lmms.model import QigModel

    manager = TaskManager(include_path=str(TASKS_DIR), model_name="qig")
    unknown = [name for name in tasks if name not in manager.all_tasks]
    if unknown:
        hints = {name: difflib.get_close_matches(name, manager.all_tasks, n=3) for name in unknown}
        said = "; ".join(f"{name!r}" + (f" (did you mean {', '.join(m)}?)" if m else "") for name, m in hints.items())
        raise QigError(f"unknown lmms-eval task {said}; `lmms-eval --tasks list` lists them, {EMBEDDED_TASK} is qig's")
    pretrained = None if model_dir is None else str(model_dir)
    model = QigModel(
        pretrained=pretrained, device=device, batch_size=batch_size, revision=revision, model_offload=model_offload
    )
    with tempfile.TemporaryDirectory(prefix="qig-lmms-") as tmp:
        n_written = min(n, limit) if limit else n  # the questions qig eval would score: eval_split's rule
        specs = [embedded_task(Path(tmp), seed, n_written) if name == EMBEDDED_TASK else name for name in tasks]
        try:
            results = simple_evaluate(
                model=model,
                tasks=specs,
                limit=limit,
                task_manager=manager,
                log_samples=True,
                bootstrap_iters=0,  # no stderr: the exact-match mean is what qig reports
                device=device,
                batch_size=batch_size,
            )
        except QigError:
            raise
        except Exception as exc:  # lmms-eval and its tasks raise anything (AssertionError, KeyError, ...): one line
            cause = _cause(exc)
            hint = ""
            if isinstance(cause, ConnectionError) or "ConnectionError" in type(cause).__name__:
                hint = "; lmms-eval's tasks fetch their datasets from the Hugging Face hub: run once online to cache"
            raise QigError(
                f"lmms-eval failed on {', '.join(tasks)}: {type(cause).__name__}: {cause}".rstrip(": ") + hint
            ) from exc
    check_results(results, tasks)
    return results


def _cause(exc: BaseException) -> BaseException:
    """The error behind lmms-eval's retries (tenacity's RetryError says only that the last try failed)."""
    last = getattr(exc, "last_attempt", None)
    inner = last.exception() if last is not None and hasattr(last, "exception") else None
    return _cause(inner) if inner is not None else exc


def embedded_task(folder: Path, seed: int, n: int) -> dict:
    """The ``qig_world`` task config pointed at the eval split written (as ``qig world eval`` does) under ``folder``."""
    data = world.write_split("eval", folder / "qig_world_data", n=n, seed=seed)
    return {
        "task": EMBEDDED_TASK,
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(folder / "hf-datasets")},
        "lmms_eval_specific_kwargs": {"default": {"image_folder": str(data.parent)}},
    }


def check_results(results: dict | None, tasks: list[str]) -> None:
    """Refuse an lmms-eval run that produced no result, or none for a task, or a metric without a value."""
    if not results or not results.get("results"):
        raise QigError(f"lmms-eval returned no results for {', '.join(tasks)}")
    got = results["results"]
    missing = [t for t in tasks if t not in got and t not in results.get("groups", {})]
    if missing:
        raise QigError(f"lmms-eval returned no results for {', '.join(missing)}")
    for task, metrics in got.items():
        values = {k: v for k, v in metrics.items() if k != "alias" and "_stderr" not in k}
        empty = [k for k, v in values.items() if v is None or v == "N/A" or v == []]
        if not values or empty:
            raise QigError(f"lmms-eval scored no value for {task} ({', '.join(empty) or 'no metric'})")


def predictions(results: dict, task: str) -> list[str]:
    """The qig model's answers to ``task``'s documents, in document order (from lmms-eval's logged samples)."""
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [s["resps"][0][0] if isinstance(s["resps"][0], list) else s["resps"][0] for s in samples]


def format_results(results: dict) -> str:
    """lmms-eval's own results table (and its groups table, where tasks form groups)."""
    from lmms_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table
