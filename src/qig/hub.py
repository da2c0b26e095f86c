"""Where a model or a calibration dataset named on the command line lives: a local folder or a Hugging Face hub id.

    >>> from qig.hub import resolve_model
    >>> resolve_model(None).repo_id is None  # the embedded model
    True
    >>> resolve_model("Qwen/Qwen2.5-VL-7B-Instruct").path  # doctest: +SKIP
    PosixPath('/root/.cache/huggingface/hub/models--Qwen--Qwen2.5-VL-7B-Instruct/snapshots/<commit>')

A reference that is an existing folder is that folder. Otherwise one that has
the shape of a hub id (``org/name`` or ``name``) is resolved through
``huggingface_hub``'s cache as transformers, vLLM and lmms-eval resolve it:
downloaded when online (weights as safetensors only: qig never unpickles a
``.bin``), read from the cache when offline (``HF_HUB_OFFLINE=1``). Errors name
the id and the way out: not cached, gated, no such repository or revision, no
network. The resolved commit is recorded (``Resolved.revision``) so a run's
report says exactly which weights it quantized.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from qig.errors import QigError
from qig.options import option

# What a model folder needs (config, weights as safetensors, tokenizer and processor files, chat templates).
MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.py"]
# A hub id: one or two names of letters, digits and -_. (huggingface_hub's rule), not a path that looks like one.
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class Resolved:
    """A local folder, and the hub id and commit it was resolved from (both None for a folder given as one)."""

    path: Path
    repo_id: str | None = None
    revision: str | None = None


def looks_like_repo_id(reference: str) -> bool:
    """Whether ``reference`` has the shape of a hub id (``org/name``), and not of a relative or absolute path.

    >>> looks_like_repo_id("Qwen/Qwen2.5-VL-7B-Instruct"), looks_like_repo_id("./out/run"), looks_like_repo_id("a/b/c")
    (True, False, False)
    """
    return bool(_REPO_ID.match(reference)) and ".." not in reference and not reference.endswith(".")


def offline() -> bool:
    """Whether the hub may not be reached (``HF_HUB_OFFLINE``), read when asked so a test can set it."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_model(
    model: str | os.PathLike | None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    config_only: bool = False,
) -> Resolved:
    """The folder of ``model``: None is the embedded model, a folder is itself, a hub id its cached snapshot.

    ``revision`` (a branch, tag or commit) applies to hub ids only; with a folder
    it is refused. Python files of the repository are fetched only with
    ``trust_remote_code`` (they run only then). ``config_only``: fetch the JSON
    files alone (config, processor settings), for a plan that reads no weight.
    """
    if not is_repo_id(model, revision):
        from qig.embedded import default_model_dir

        return Resolved(Path(model) if model is not None else default_model_dir())
    reference = os.fspath(model)
    if Path(reference).exists():
        raise QigError(f"--model {reference} is a file, not a folder; pass a model folder or a hub id (org/name)")
    patterns = MODEL_FILES if trust_remote_code else [p for p in MODEL_FILES if p != "*.py"]
    if config_only:
        patterns = ["*.json"]
    return _snapshot(reference, "model", revision, patterns)


def is_repo_id(model: str | os.PathLike | None, revision: str | None = None) -> bool:
    """Whether ``model`` names a hub model rather than a folder; a ``revision`` with a folder is refused (cheap: no I/O
    beyond a stat, so commands call it before any work)."""
    if model is None:
        if revision is not None:
            raise QigError("--revision goes with a hub id in --model (e.g. --model Qwen/Qwen2-VL-2B-Instruct)")
        return False
    reference = os.fspath(model)
    if Path(reference).is_dir() or not looks_like_repo_id(reference):
        if revision is not None:
            raise QigError(f"--revision {revision} applies to a hub id, not to the folder {reference}; drop it")
        return False
    return True


def resolve_dataset(repo_id: str, revision: str | None = None) -> Resolved:
    """A hub dataset's cached snapshot (its parquet, JSON and JSONL data files; downloaded when online)."""
    return _snapshot(repo_id, "dataset", revision, ["*.parquet", "*.json", "*.jsonl", "README.md"])


def _snapshot(repo_id: str, kind: str, revision: str | None, patterns: list[str]) -> Resolved:
    """``huggingface_hub.snapshot_download`` with every failure as a one-line error naming the id and the fix."""
    try:
        from huggingface_hub import errors as hub_errors
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise QigError(f"{repo_id} is not a local folder, and reading hub ids needs huggingface_hub") from exc
    what = "model" if kind == "model" else "dataset"
    flag = "--model" if kind == "model" else "--calib"
    at = f" at revision {revision}" if revision else ""
    cli = f"hf download {'--repo-type dataset ' if kind == 'dataset' else ''}{repo_id}" + (
        f" --revision {revision}" if revision else ""
    )
    try:
        folder = snapshot_download(
            repo_id,
            repo_type=kind,
            revision=revision,
            allow_patterns=patterns,
            cache_dir=_cache_dir(),
            local_files_only=offline(),
        )
    except hub_errors.GatedRepoError as exc:
        raise QigError(
            f"{what} {repo_id} is gated: accept its terms at https://huggingface.co/{_url(repo_id, kind)} and log in "
            "(hf auth login, or HF_TOKEN)"
        ) from exc
    except hub_errors.RepositoryNotFoundError as exc:
        raise QigError(
            f"{flag} {repo_id}: no such folder here, and no such {what} on the hub (or it is private: log in with "
            "hf auth login); check the spelling"
        ) from exc
    except hub_errors.RevisionNotFoundError as exc:
        raise QigError(f"{what} {repo_id} has no revision {revision!r}; use a branch, tag or commit it has") from exc
    except hub_errors.LocalEntryNotFoundError as exc:
        why = "the hub is off (HF_HUB_OFFLINE=1)" if offline() else "the hub could not be reached"
        raise QigError(
            f"{flag} {repo_id}: no such folder here, and {what} {repo_id}{at} is not in the Hugging Face cache "
            f"({_cache_dir()}) while {why}; download it first where there is network ({cli}), point HF_HOME or "
            "HF_HUB_CACHE at a cache that holds it, or pass a local folder"
        ) from exc
    except (hub_errors.HfHubHTTPError, OSError) as exc:
        raise QigError(f"could not fetch {what} {repo_id}{at}: {' '.join(str(exc).split())}") from exc
    path = Path(folder)
    commit = path.name if _COMMIT.match(path.name) else revision
    return Resolved(path, repo_id, commit)


def _url(repo_id: str, kind: str) -> str:
    return repo_id if kind == "model" else f"datasets/{repo_id}"


def _cache_dir() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or str(constants.HF_HUB_CACHE)


# The flags that name a model or a calibration source, declared once for every command that takes them.
def model_option():
    return option(
        None, "model folder or hub id such as Qwen/Qwen2-VL-2B-Instruct (default: the embedded model)", path=True
    )


def revision_option():
    return option(None, "branch, tag or commit of a hub id in --model (default: main)")


def model_offload_option(default: str = "auto"):
    """``--model-offload`` (quantize's default auto; eval's none: there each forward pass reads the decoder)."""
    return option(
        default,
        "disk: read each decoder layer from the checkpoint when it is used (host memory: the rest of the "
        "model and a layer); none: load the whole model; auto: disk when the decoder passes a quarter of the "
        "available host memory",
    )


def calib_split_option():
    return option(None, "split of a hub dataset id in --calib (default: its only split)")


def calib_images_option():
    return option(None, "images of --calib (default: the file's folder)", path=True)
