"""Under data parallelism, a rank's own error is what every rank reports (issue 14 item 11): the failing rank
raises its error, the others raise PeerFailed carrying its message, instead of crashing on a broken connection
(torchrun reports whichever rank failed first as the root cause, so every rank must name the real error)."""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch

from bertfast.train.trainer import TrainConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, fail_rank: int, out: str, logdir: str):
    import bertfast.data
    from bertfast.data import DataError
    from bertfast.train.trainer import train

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    real = bertfast.data.load_data

    def load_data(*a, **k):
        if rank == fail_rank:
            raise DataError("--data corpus.txt", f"a bad byte on rank {rank}", "Fix the file.")
        return real(*a, **k)
    bertfast.data.load_data = load_data
    cfg = TrainConfig(preset="tiny", max_len=64, builtin_docs=60, batch_size=4, max_steps=2, output_dir=out,
                      progress=False, threads=1, device="cpu", checkpoint_every=0)
    try:
        train(cfg, log=lambda *_: None)
        result = {"error": None}
    except Exception as e:  # noqa: BLE001 - recorded for the test
        result = {"error": type(e).__name__, "message": str(e)}
    with open(os.path.join(logdir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


@pytest.mark.parametrize("fail_rank", [0, 1])
def test_a_ranks_data_error_is_what_every_rank_reports(tmp_path, fail_rank):
    pytest.importorskip("datasets")
    ctx = torch.multiprocessing.spawn(_worker, args=(_free_port(), fail_rank, str(tmp_path / "out"), str(tmp_path)),
                                      nprocs=2, join=False)
    try:
        while not ctx.join(timeout=120):
            pass
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    got = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)}
    assert got[fail_rank]["error"] == "DataError", got
    other = got[1 - fail_rank]
    assert other["error"] == "PeerFailed" and f"rank {fail_rank} failed" in other["message"], got
    assert f"a bad byte on rank {fail_rank}" in other["message"], got
