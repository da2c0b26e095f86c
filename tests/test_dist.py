"""Data-parallel calibration (``qig.dist``): 2 gloo processes give one process's bits; a failing rank stops all."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from _tensors import same

import qig
from qig.calib import calibration_for
from qig.loading import load_model_and_processor
from qig.methods import GPTQConfig
from qig.methods.config import make_config

N_SAMPLES, BATCH = 8, 2  # 4 chunks: 2 per rank
METHODS = {
    "awq": dict(wbits=3, n_grid=5),
    "mbq": dict(wbits=3, n_grid=5, grad_batch_size=2),
    "qig": dict(wbits=3, n_grid=5),
    "gptq": dict(wbits=3),
    "gptq-qig": dict(wbits=3),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, size: int, port: int) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)


def _config(name: str):
    if name == "gptq-qig":
        return GPTQConfig.weighted_by("qig", batch_size=BATCH, **METHODS[name])
    return make_config(name, batch_size=BATCH, **METHODS[name])


def _run_all() -> dict:
    out = {}
    for name in METHODS:
        model, processor = load_model_and_processor()
        calib = calibration_for(model, processor, None, n_samples=N_SAMPLES)
        result = qig.quantize(model, _config(name), calib, progress=False)
        out[name] = ({k: v.clone() for k, v in result.tensors().items()}, model.state_dict())
    return out


def _worker(rank: int, size: int, port: int, folder: str) -> None:
    import torch.distributed as dist

    _env(rank, size, port)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        results = _run_all()
        if rank == 0:
            from safetensors.torch import save_file

            for name, (search, state) in results.items():
                save_file(search, os.path.join(folder, f"{name}-search.safetensors"))
                save_file(
                    {k: v.contiguous() for k, v in state.items()}, os.path.join(folder, f"{name}-model.safetensors")
                )
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_bits_of_one(tmp_path):
    """awq, mbq, qig, gptq and gptq with QIG weights: same scales, token weights, quantizer state and weights."""
    from safetensors.torch import load_file

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: BLAS products (GPTQ's X^T X) round by their thread count
    try:
        single = _run_all()
    finally:
        torch.set_num_threads(threads)
    for name, (search, state) in single.items():
        assert same(load_file(tmp_path / f"{name}-search.safetensors"), search), name
        two = load_file(tmp_path / f"{name}-model.safetensors")
        assert same(two, {k: v.contiguous() for k, v in state.items()}), name


def _cli_worker(rank: int, size: int, port: int, argv: list[str], codes) -> None:
    """``qig quantize`` as torchrun runs it on one rank; rank 1's second chunk turns NaN at layer 2."""
    _env(rank, size, port)
    if rank == 1:
        import qig.pipeline.streams as streams

        real = streams.next_input

        def corrupt(layer, h, chunk, index, params=None):
            out = real(layer, h, chunk, index, params)
            return out * float("nan") if index == 2 else out

        streams.next_input = corrupt
    from qig.cli import main

    codes[rank] = main(argv)


def test_a_failing_rank_stops_every_rank_with_its_message_and_nothing_is_written(tmp_path, capfd):
    out = tmp_path / "out"
    argv = ["quantize", "--method", "awq", "--wbits", "3", "--n-grid", "4", "--n-samples", str(N_SAMPLES)]
    argv += ["--batch-size", str(BATCH), "--output", str(out), "--no-progress"]
    codes = mp.Manager().dict()
    mp.spawn(_cli_worker, args=(2, _free_port(), argv, codes), nprocs=2, join=True)
    assert dict(codes) == {0: 2, 1: 2}
    err = capfd.readouterr().err
    assert "error: rank 1 of 2 failed: layer 2's output on the FP stream x holds NaN or inf" in err
    assert not out.exists()
    # layers 0-2 were finished before the failure (layer 2 fails on its way out, on rank 1): kept for --resume
    kept = sorted(p.name for p in (tmp_path / "out.partial").glob("layer-*.json"))
    assert kept == ["layer-00000.json", "layer-00001.json", "layer-00002.json"]
    # both ranks resume from rank 0's journal; the result is one uninterrupted process's
    codes = mp.Manager().dict()
    mp.spawn(_cli_worker_plain, args=(2, _free_port(), [*argv, "--resume"], codes), nprocs=2, join=True)
    assert dict(codes) == {0: 0, 1: 0} and not (tmp_path / "out.partial").exists()
    from _cli import run_cli
    from _tensors import model_tensors

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        whole = tmp_path / "whole"
        assert run_cli(*[a if a != str(out) else whole for a in argv]) == 0
    finally:
        torch.set_num_threads(threads)
    assert same(model_tensors(whole), model_tensors(out))
    assert (whole / "search.safetensors").read_bytes() == (out / "search.safetensors").read_bytes()


def test_too_few_chunks_for_the_ranks_is_refused(tmp_path, capfd):
    argv = ["quantize", "--method", "awq", "--wbits", "3", "--n-samples", "2", "--batch-size", "2"]
    argv += ["--output", str(tmp_path / "o"), "--no-progress"]
    codes = mp.Manager().dict()
    mp.spawn(_cli_worker_plain, args=(2, _free_port(), argv, codes), nprocs=2, join=True)
    assert dict(codes) == {0: 2, 1: 2}
    assert "make 1 chunks, fewer than the 2 processes" in capfd.readouterr().err


def _cli_worker_plain(rank: int, size: int, port: int, argv: list[str], codes) -> None:
    _env(rank, size, port)
    from qig.cli import main

    codes[rank] = main(argv)


@pytest.mark.parametrize("size", [1])
def test_one_rank_outside_a_process_group(size):
    from qig import dist

    assert dist.current().size == size and dist.ordered([3, 1]) == [3, 1] and json.dumps(dist.gather({"a": 1}))
