"""Which scheme vLLM's own compressed-tensors parser picks for an export's decoder linears (no GPU needed).

Run in the vLLM venv (scripts/check_vllm.sh step 5): for each folder, vLLM's
``CompressedTensorsConfig.from_config`` reads the export's
``quantization_config`` and ``get_scheme`` chooses the scheme class for the
first decoder linear, as vLLM does when it builds the model on a GPU of
capability ``--capability`` (90: H100, 100: B200); the class's
``get_min_capability()`` is the GPU it needs. Two things are stood in for, as
there is no GPU here: the platform's capability (vLLM asks it to choose
between schemes), and the chosen class's constructor (it picks GPU kernels),
which is not run. A row passes when the class is the one expected.

    python scripts/vllm_schemes.py --capability 100 NAME=FOLDER=EXPECTED_CLASS ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def stand_in_gpu(capability: int) -> None:
    """vLLM's platform answers ``capability``; its scheme classes are recorded, not built (no GPU kernels)."""
    from vllm.model_executor.layers.quantization.compressed_tensors import compressed_tensors as parser
    from vllm.platforms import current_platform
    from vllm.platforms.interface import DeviceCapability

    current_platform.get_device_capability = lambda device_id=0: DeviceCapability(capability // 10, capability % 10)
    for name, cls in list(vars(parser).items()):
        if isinstance(cls, type) and name.startswith("CompressedTensorsW"):
            setattr(parser, name, type(name, (cls,), {"__init__": _record}))


def _record(self, *args, **kwargs) -> None:
    self.kwargs = kwargs


def picked(folder: Path) -> tuple[str, int]:
    """The scheme class vLLM picks for the folder's first decoder linear, and its minimum GPU capability."""
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )

    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    parsed = CompressedTensorsConfig.from_config(config)
    scheme = parsed.get_scheme(torch.nn.Linear(16, 16), "model.language_model.layers.0.self_attn.q_proj")
    return type(scheme).__name__, type(scheme).__mro__[1].get_min_capability()


def main(argv: list[str]) -> int:
    failed = 0
    capability = 90
    if argv[:1] == ["--capability"]:
        capability, argv = int(argv[1]), argv[2:]
    stand_in_gpu(capability)
    print(f"vLLM's parser, as on a GPU of capability sm{capability}:")
    print(f"{'export':<20} {'vLLM scheme':<32} {'min GPU':>8}  expected")
    for arg in filter(None, argv):  # an empty argument: a row the caller left out
        name, folder, expected = arg.split("=")
        try:
            cls, capability = picked(Path(folder))
        except Exception as exc:  # noqa: BLE001 (a row reports whatever vLLM raised)
            cls, capability = f"refused: {type(exc).__name__}: {exc}"[:60], 0
        ok = cls == expected
        failed += not ok
        print(f"{name:<20} {cls:<32} {'sm' + str(capability):>8}  {'ok' if ok else 'EXPECTED ' + expected}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
