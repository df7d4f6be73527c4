"""The training loop: loss falls, checkpoints resume exactly, corrupt checkpoints are skipped, non-finite losses
skip their step, DDP on 2 CPU processes equals 1 process, gradient accumulation equals a bigger batch, the HF
export loads in transformers with equal logits. All CPU, tiny model, a small built-in corpus, few steps."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import random
import shutil
import signal
import socket
import time

import pytest
import torch

from bertfast.train import checkpoint as ckpt
from bertfast.train.trainer import (ConfigError, Interrupted, LinearWarmupDecay, TrainConfig, TrainingError, param_groups,
                              train, validate_config)

DOCS = 120  # documents of the built-in corpus for these tests


def tiny_cfg(out, **kw) -> TrainConfig:
    base = dict(preset="tiny", max_len=64, builtin_docs=DOCS, batch_size=8, max_steps=12, lr=2e-3, warmup_steps=3,
                log_every=2, checkpoint_every=4, keep_checkpoints=10, output_dir=str(out), progress=False,
                threads=1, seed=0, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def read_metrics(out, kind: str = "train") -> list[dict]:
    """The training records of metrics.jsonl (kind "eval": the evaluation records; "all": both, in order)."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    if kind == "all":
        return recs
    return [r for r in recs if ("eval_mlm_loss" in r) == (kind == "eval")]


def deterministic(recs: list[dict]) -> list[dict]:
    """A record without the wall-clock fields."""
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu", "tflops_per_s")} for r in recs]


def load_weights(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One short run (24 steps) shared by several tests; its tokenizer is reused to skip retraining it."""
    pytest.importorskip("datasets", reason="the data pipeline needs `datasets` (the GPU image lacks it: see "
                        "scripts/gpu_wheels.sh)")
    out = tmp_path_factory.mktemp("run")
    export = tmp_path_factory.mktemp("hf")
    cfg = tiny_cfg(out, max_steps=24, export_hf=str(export))
    summary = train(cfg, log=lambda *_: None)
    return cfg, summary, out, export


def test_train_loss_falls_and_writes_everything(run):
    cfg, summary, out, export = run
    recs = read_metrics(out)
    assert [r["step"] for r in recs] == list(range(2, 25, 2))
    for r in recs:
        for k in ("step", "loss", "mlm_loss", "nsp_loss", "mlm_acc", "nsp_acc", "lr", "tokens_per_s"):
            assert k in r and math.isfinite(r[k]), (k, r)
        assert abs(r["loss"] - (r["mlm_loss"] + r["nsp_loss"])) < 1e-9
        assert 0 <= r["mlm_acc"] <= 1 and 0 <= r["nsp_acc"] <= 1
    first, last = recs[0]["mlm_loss"], recs[-1]["mlm_loss"]
    assert last < first - 0.5, (first, last)
    assert recs[-1]["lr"] == 0.0  # linear decay to zero at the last step
    assert summary["step"] == 24 and summary["loss"] == recs[-1]["loss"]
    steps = [s for s, _ in ckpt.list_checkpoints(out)]
    assert steps == [24, 20, 16, 12, 8, 4]
    for _, path in ckpt.list_checkpoints(out):
        ckpt.verify_checkpoint(path)
    with open(os.path.join(out, "checkpoints", "latest")) as f:
        assert f.read().strip() == "step_00000024"
    with open(os.path.join(out, "model_config.json")) as f:
        mc = json.load(f)
    assert (mc["hidden_size"], mc["num_hidden_layers"], mc["max_len"]) == (128, 2, 512)  # 512 positions
    assert os.path.isfile(os.path.join(out, "tokenizer", "tokenizer.json"))
    if importlib.util.find_spec("matplotlib"):  # the curves, drawn at the end when matplotlib is installed
        with open(os.path.join(out, "metrics.png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    state = torch.load(os.path.join(out, "checkpoints", "step_00000012", "state.pt"), weights_only=False)
    assert set(state["ranks"][0]["rng"]) >= {"python", "numpy", "torch"}
    assert state["data"]["batches_consumed"] + state["data"]["epoch"] * state["data"]["batches_per_epoch"] == 12


def test_train_keep_checkpoints(run, tmp_path):
    cfg, _, out, _ = run
    cfg2 = dataclasses.replace(cfg, output_dir=str(tmp_path), max_steps=6, checkpoint_every=2, keep_checkpoints=2,
                               export_hf=None, tokenizer=os.path.join(out, "tokenizer"))
    train(cfg2, log=lambda *_: None)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [6, 4]
    assert not [n for n in os.listdir(tmp_path / "checkpoints") if n.startswith(".tmp")]


def test_train_corrupt_checkpoint_is_skipped_and_resume_is_exact(run, tmp_path, capsys):
    """Truncate the newest checkpoint's weights and remove the later ones: resume reports it by name, uses the
    previous one, and the logged losses from there on equal the uninterrupted run's, bit for bit."""
    cfg, _, out, _ = run
    work = tmp_path / "run"
    shutil.copytree(out, work)
    for step in (24, 20):
        shutil.rmtree(work / "checkpoints" / ckpt.checkpoint_name(step))
    bad = work / "checkpoints" / "step_00000016" / "model.safetensors"
    with open(bad, "r+b") as f:
        f.truncate(os.path.getsize(bad) // 2)
    found = ckpt.find_latest_checkpoint(str(work))
    assert found.step == 12
    assert any("step_00000016" in m and "model.safetensors" in m for m in found.skipped), found.skipped
    logs, loaded = [], []
    from bertfast.data.loader import _PairSamples

    real = _PairSamples.__getitems__
    cfg2 = dataclasses.replace(cfg, output_dir=str(work), resume=True, export_hf=None)
    with pytest.MonkeyPatch.context() as mp:  # record every sample the resumed run reads
        mp.setattr(_PairSamples, "__getitems__", lambda self, keys: loaded.append(list(keys)) or real(self, keys))
        train(cfg2, log=logs.append)
    # it read exactly the 12 batches after the checkpoint's 12: nothing consumed is read again, nothing skipped
    from bertfast.data import load_data

    _, loader = load_data(cfg.data, tokenizer=os.path.join(out, "tokenizer"), max_len=cfg.max_len,
                          batch_size=cfg.batch_size, seed=cfg.seed, builtin_docs=cfg.builtin_docs, drop_last=True,
                          eval_fraction=cfg.eval_fraction)
    order = [[(e, i) for i in idx] for e in range(3) for idx in loader.batch_indices(e)]
    from bertfast.data.loader import EVAL_EPOCH

    assert [keys for keys in loaded if keys[0][0] != EVAL_EPOCH] == order[12:24]  # evaluations read their own
    assert any("step_00000016" in m and "corrupt" in m for m in logs), logs
    assert any("resuming from" in m and "step_00000012" in m for m in logs), logs
    assert deterministic(read_metrics(work, "all")) == deterministic(read_metrics(out, "all"))
    for k, v in load_weights(work / "checkpoints" / "step_00000024").items():
        assert torch.equal(v, load_weights(out / "checkpoints" / "step_00000024")[k]), k


def test_train_resume_refuses_another_model(run, tmp_path):
    cfg, _, out, _ = run
    work = tmp_path / "run"
    shutil.copytree(out, work)
    with pytest.raises(ConfigError, match="--resume.*another model configuration.*hidden_size"):
        validate_config(dataclasses.replace(cfg, output_dir=str(work), resume=True, preset="mini", export_hf=None))
    with open(work / "model_config.json") as f:
        mc = json.load(f)
    mc["vocab_size"] += 1
    with pytest.raises(ckpt.CheckpointError, match="another model configuration.*vocab_size"):
        ckpt.check_model_config(str(work / "checkpoints" / "step_00000024"), mc)


def test_train_resume_of_a_finished_run_says_so(run, tmp_path):
    cfg, summary, out, _ = run
    shutil.copytree(out, tmp_path / "done")
    logs = []
    again = train(dataclasses.replace(cfg, output_dir=str(tmp_path / "done"), resume=True, export_hf=None),
                  log=logs.append)
    assert again["step"] == summary["step"] == 24
    assert any("nothing left to train" in m and "--max-steps" in m for m in logs), logs
    assert read_metrics(tmp_path / "done", "all") == read_metrics(out, "all")


def test_train_new_run_over_an_existing_one_is_refused_and_a_failed_attempt_restarts_clean(run, tmp_path):
    cfg, _, out, _ = run
    with pytest.raises(ConfigError, match=r"--output-dir.*already holds a run.*step 24.*--resume"):
        validate_config(dataclasses.replace(cfg, resume=False))
    # an attempt that logged but never checkpointed: a new run there starts metrics.jsonl afresh
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "metrics.jsonl").write_text('{"step": 2, "loss": 1.0}\n{"step": 4, "loss": 0.5}\n')
    train(dataclasses.replace(cfg, output_dir=str(fresh), max_steps=2, log_every=1, export_hf=None,
                              tokenizer=os.path.join(out, "tokenizer")), log=lambda *_: None)
    assert [r["step"] for r in read_metrics(fresh)] == [1, 2]


def test_train_resume_without_checkpoint_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="--resume.*nothing to resume"):
        validate_config(tiny_cfg(tmp_path, resume=True))


def test_train_nonfinite_loss_skips_step_then_stops(run, tmp_path):
    cfg, _, out, _ = run
    tok = os.path.join(out, "tokenizer")
    c = dataclasses.replace(cfg, output_dir=str(tmp_path / "a"), max_steps=4, checkpoint_every=1, log_every=1,
                            export_hf=None, tokenizer=tok, max_bad_steps=3)
    # a single bad step (the third, step index 2): skipped, counted, weights untouched, the run goes on
    train(c, log=lambda *_: None, loss_hook=lambda step, loss: loss * math.inf if step == 2 else loss)
    recs = read_metrics(tmp_path / "a")
    assert [r["skipped_steps"] for r in recs] == [0, 0, 1, 0]
    assert not math.isfinite(recs[2]["loss"]) and math.isfinite(recs[3]["loss"])
    w2, w3, w4 = (load_weights(tmp_path / "a" / "checkpoints" / ckpt.checkpoint_name(s)) for s in (2, 3, 4))
    assert all(torch.equal(w2[k], w3[k]) for k in w2)
    assert not all(torch.equal(w3[k], w4[k]) for k in w3)
    # bad from step index 2 on: stops after 3 in a row with a clear message; the last good checkpoint is intact
    c2 = dataclasses.replace(c, output_dir=str(tmp_path / "b"), max_steps=10, checkpoint_every=2)
    with pytest.raises(TrainingError, match=r"3 non-finite losses in a row.*step_00000004.*intact"):
        train(c2, log=lambda *_: None, loss_hook=lambda step, loss: loss * math.nan if step >= 2 else loss)
    found = ckpt.find_latest_checkpoint(str(tmp_path / "b"))
    assert found.step == 4 and not found.skipped  # step 4 (two skipped steps in) is the newest, and intact


def test_train_fp16_overflow_skips_step_and_lowers_scale(run, tmp_path):
    """fp16 with a GradScaler (CPU autocast): an injected inf loss skips the step and halves the loss scale."""
    cfg, _, out, _ = run
    c = dataclasses.replace(cfg, output_dir=str(tmp_path), max_steps=3, checkpoint_every=1, log_every=1,
                            export_hf=None, tokenizer=os.path.join(out, "tokenizer"), precision="fp16")
    train(c, log=lambda *_: None, loss_hook=lambda step, loss: loss * math.inf if step == 1 else loss)
    recs = read_metrics(tmp_path)
    assert [r["skipped_steps"] for r in recs] == [0, 1, 0]
    assert recs[1]["loss_scale"] == recs[0]["loss_scale"] / 2
    assert math.isfinite(recs[2]["loss"])
    w1, w2 = (load_weights(tmp_path / "checkpoints" / ckpt.checkpoint_name(s)) for s in (1, 2))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


class _InfGrad(torch.autograd.Function):
    """Identity forward (a finite loss); an infinite gradient backward: an fp16 overflow in the backward pass."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * math.inf


def test_train_fp16_gradient_overflow_is_counted_and_lowers_scale_without_reading_it(run, tmp_path):
    """A finite loss whose gradients overflow: the step is not taken (weights unchanged), counted under
    overflow_steps (not skipped_steps), the scale halves; the step's decision comes from its one flags read, so the
    loss scale is read only when a step is logged."""
    from bertfast.train.state import HOST_READS

    cfg, _, out, _ = run
    c = dataclasses.replace(cfg, output_dir=str(tmp_path), max_steps=4, checkpoint_every=1, log_every=2,
                            export_hf=None, tokenizer=os.path.join(out, "tokenizer"), precision="fp16")
    HOST_READS.clear()
    train(c, log=lambda *_: None, loss_hook=lambda step, loss: _InfGrad.apply(loss) if step == 2 else loss)
    recs = read_metrics(tmp_path)
    assert [r["skipped_steps"] for r in recs] == [0, 0] and [r["overflow_steps"] for r in recs] == [0, 1]
    assert recs[1]["loss_scale"] == recs[0]["loss_scale"] / 2 and all(math.isfinite(r["loss"]) for r in recs)
    w2, w3, w4 = (load_weights(tmp_path / "checkpoints" / ckpt.checkpoint_name(s)) for s in (2, 3, 4))
    assert all(torch.equal(w2[k], w3[k]) for k in w2) and not all(torch.equal(w3[k], w4[k]) for k in w3)
    assert HOST_READS["fp16_scale"] == len(recs), dict(HOST_READS)  # the logged loss_scale only


def test_a_new_model_pads_its_vocabulary_and_a_run_keeps_its_own(run, tmp_path, monkeypatch):
    """New models take the tokenizer's size rounded up to a multiple of 8; a resumed run and --init-from keep the
    vocabulary their weights have (here one a different rule chose: the tokenizer's size + 3)."""
    from bertfast.data.tokenizer import load_tokenizer
    from bertfast.train import config as config_mod
    from bertfast.train.config import build_model_config, padded_vocab_size

    cfg, _, out, _ = run
    tok = load_tokenizer(os.path.join(out, "tokenizer"))
    assert [padded_vocab_size(n) for n in (1, 8, 9, 300, 30522)] == [8, 8, 16, 304, 30528]
    assert build_model_config(cfg, tok).vocab_size == padded_vocab_size(len(tok))
    assert build_model_config(cfg, tok, vocab_size=len(tok) + 3).vocab_size == len(tok) + 3

    def vocab(folder):
        with open(os.path.join(folder, "model_config.json")) as f:
            return json.load(f)["vocab_size"]

    c = dataclasses.replace(cfg, output_dir=str(tmp_path / "old"), max_steps=1, checkpoint_every=1, log_every=1,
                            export_hf=None, tokenizer=os.path.join(out, "tokenizer"), eval_fraction=0.0)
    monkeypatch.setattr(config_mod, "padded_vocab_size", lambda n: n + 3)
    train(c, log=lambda *_: None)
    monkeypatch.undo()
    assert vocab(tmp_path / "old") == len(tok) + 3
    train(dataclasses.replace(c, max_steps=2, resume=True), log=lambda *_: None)
    assert vocab(tmp_path / "old") == len(tok) + 3
    init = dataclasses.replace(c, output_dir=str(tmp_path / "init"), tokenizer=None,
                               init_from=str(tmp_path / "old"))
    train(init, log=lambda *_: None)
    assert vocab(tmp_path / "init") == len(tok) + 3


def test_train_grad_accum_equals_bigger_batch(run, tmp_path):
    cfg, _, out, _ = run
    tok = os.path.join(out, "tokenizer")
    common = dict(max_steps=3, log_every=1, checkpoint_every=0, export_hf=None, tokenizer=tok, dropout=0.0)
    big = dataclasses.replace(cfg, output_dir=str(tmp_path / "big"), batch_size=8, **common)
    acc = dataclasses.replace(cfg, output_dir=str(tmp_path / "acc"), batch_size=4, grad_accum=2, **common)
    train(big, log=lambda *_: None)
    train(acc, log=lambda *_: None)
    _assert_same_run(tmp_path / "big", tmp_path / "acc")


def _assert_same_run(a, b, tol=1e-6):
    """Same metrics (to tol, relative above 1: a float32 loss near 7.8 has an ulp of 4.8e-7) and weights (to tol)."""
    ra, rb = read_metrics(a), read_metrics(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        for k in ("loss", "mlm_loss", "nsp_loss", "mlm_acc", "nsp_acc", "lr"):
            assert abs(x[k] - y[k]) <= tol * max(1.0, abs(x[k])), (x["step"], k, x[k], y[k])
    step = ra[-1]["step"]
    wa = load_weights(os.path.join(a, "checkpoints", ckpt.checkpoint_name(step)))
    wb = load_weights(os.path.join(b, "checkpoints", ckpt.checkpoint_name(step)))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=tol, msg=k)


def _free_port() -> int:
    """A free port below the kernel's ephemeral range. A port from bind(0) lies inside that range, and a client
    retrying to connect to it before the store listens can be handed that very port as its own source port: TCP
    then connects the socket to itself (simultaneous open), and the rendezvous breaks."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1025, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port found below {low}")


def _ddp_worker(rank: int, world: int, rendezvous: str, cfg: TrainConfig, logdir: str):
    """One rank; its stderr (and a fault handler's traceback on a crash) go to logdir/rank{rank}.log.
    rendezvous "env:PORT": torchrun's variables, and train() starts the process group itself;
    "file:PATH": the process group is started here on a FileStore, and train() runs inside it."""
    import faulthandler

    import torch.distributed as dist

    log = open(os.path.join(logdir, f"rank{rank}.log"), "w", buffering=1)
    os.dup2(log.fileno(), 2)
    faulthandler.enable(log)
    kind, where = rendezvous.split(":", 1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    if kind == "env":
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=where)
        train(cfg, log=lambda *_: None)
        assert not dist.is_initialized()  # train() destroyed the group it made
        return
    dist.init_process_group("gloo", init_method=f"file://{where}", rank=rank, world_size=world)
    try:
        train(cfg, log=lambda *_: None)
    except Interrupted as e:  # recorded for the test to compare across ranks
        with open(os.path.join(logdir, f"rank{rank}.stopped.json"), "w") as f:
            json.dump({"signum": e.signum, "step": e.step, "checkpoint": e.checkpoint}, f)
    finally:
        assert dist.is_initialized()  # a caller's group is the caller's to destroy
        dist.destroy_process_group()


def _spawn(cfg: TrainConfig, rendezvous: str, logdir, during=None, timeout: float = 300) -> None:
    """Run 2 ranks to the end; during(processes), if given, is called once they have started. Ranks still running
    after `timeout` seconds (ranks that disagree on a collective wait forever) are killed and the test fails."""
    os.makedirs(logdir, exist_ok=True)
    try:
        ctx = torch.multiprocessing.spawn(_ddp_worker, args=(2, rendezvous, cfg, str(logdir)), nprocs=2, join=False)
        deadline = time.time() + timeout
        try:
            if during is not None:
                during(ctx.processes)
            while not ctx.join(timeout=1):
                if time.time() > deadline:
                    raise TimeoutError(f"the ranks still ran after {timeout:.0f} s (a hang?)")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join()
    except Exception as e:  # the ranks' own stderr says why, which the exception alone does not
        logs = []
        for r in range(2):
            path = os.path.join(logdir, f"rank{r}.log")
            if os.path.exists(path):
                with open(path) as f:
                    logs.append(f"--- rank {r} stderr (tail) ---\n" + f.read()[-4000:])
        raise AssertionError(f"{e}\n" + "\n".join(logs)) from e


def test_train_ddp_two_processes_equal_one(run, tmp_path):
    """2 gloo processes x 4 sequences == 1 process x 8 (same global batch): losses and weights within 1e-6; then a
    2-process resume from a checkpoint inside a log window gives the 2-process run's metrics exactly. The first
    run starts its process group from torchrun's variables, the resume runs inside a group the caller made."""
    cfg, _, out, _ = run
    tok = os.path.join(out, "tokenizer")
    common = dict(max_steps=4, log_every=2, checkpoint_every=1, export_hf=None, tokenizer=tok, dropout=0.0)
    one = dataclasses.replace(cfg, output_dir=str(tmp_path / "one"), batch_size=8, **common)
    two = dataclasses.replace(cfg, output_dir=str(tmp_path / "two"), batch_size=4, **common)
    train(one, log=lambda *_: None)
    _spawn(two, f"env:{_free_port()}", tmp_path / "logs_two")
    recs = read_metrics(tmp_path / "two")
    assert len(recs) == 2  # rank 0 alone wrote the log
    _assert_same_run(tmp_path / "one", tmp_path / "two")
    shutil.copytree(tmp_path / "two", tmp_path / "resumed")
    for step in (2, 3, 4):
        shutil.rmtree(tmp_path / "resumed" / "checkpoints" / ckpt.checkpoint_name(step))
    resumed = dataclasses.replace(two, output_dir=str(tmp_path / "resumed"), resume=True)
    _spawn(resumed, f"file:{tmp_path / 'rendezvous'}", tmp_path / "logs_resumed")
    assert deterministic(read_metrics(tmp_path / "resumed", "all")) == deterministic(read_metrics(tmp_path / "two",
                                                                                                  "all"))


def test_train_ddp_signal_to_one_rank_stops_every_rank_at_one_step(run, tmp_path):
    """SIGTERM to rank 1 alone (a preempted worker): both ranks finish the same step, rank 0 writes that step's
    checkpoint and both raise Interrupted naming it; resuming the pair from it gives the uninterrupted 2-rank run's
    metrics exactly."""
    cfg, _, out, _ = run
    common = dict(max_steps=30, log_every=2, checkpoint_every=1000, export_hf=None,
                  tokenizer=os.path.join(out, "tokenizer"), dropout=0.0, batch_size=4)
    full = dataclasses.replace(cfg, output_dir=str(tmp_path / "full"), **common)
    stopped = dataclasses.replace(cfg, output_dir=str(tmp_path / "stopped"), **common)
    _spawn(full, f"file:{tmp_path / 'rdzv_full'}", tmp_path / "logs_full")

    def signal_rank1(processes):
        deadline = time.time() + 240
        metrics = tmp_path / "stopped" / "metrics.jsonl"
        while time.time() < deadline and all(p.is_alive() for p in processes):
            if metrics.exists() and len(read_metrics(tmp_path / "stopped")) >= 2:
                break
            time.sleep(0.01)
        assert all(p.is_alive() for p in processes), "the run ended before it could be stopped"
        os.kill(processes[1].pid, signal.SIGTERM)

    logs = tmp_path / "logs_stopped"
    _spawn(stopped, f"file:{tmp_path / 'rdzv_stopped'}", logs, during=signal_rank1)
    ends = [json.loads((logs / f"rank{r}.stopped.json").read_text()) for r in range(2)]
    assert ends[0] == ends[1], ends
    step = ends[0]["step"]
    assert ends[0]["signum"] == signal.SIGTERM and 4 <= step < 30, ends
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "stopped")] == [step]
    resumed = dataclasses.replace(stopped, resume=True)
    _spawn(resumed, f"file:{tmp_path / 'rdzv_resumed'}", tmp_path / "logs_resumed")
    assert deterministic(read_metrics(tmp_path / "stopped", "all")) == deterministic(read_metrics(tmp_path / "full",
                                                                                                  "all"))


# Not marked `gpu`: DESIGN.md keeps the `gpu` tests free of `datasets`, which the GPU image lacks; this one runs
# in the GPU script's whole-suite stage when the wheels of scripts/gpu_wheels.sh are carried.
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_train_on_gpu(run, tmp_path, precision):
    """The whole loop on a GPU with the default kernels (impl auto): finite metrics, the MLM loss falls, MFU is
    logged for a known card, and the checkpoint's weights are finite."""
    cfg, _, out, _ = run
    gpu = dataclasses.replace(cfg, output_dir=str(tmp_path / "gpu"), device="cuda", precision=precision,
                              max_steps=24, checkpoint_every=12, export_hf=None, threads=0,
                              tokenizer=os.path.join(out, "tokenizer"))
    summary = train(gpu, log=lambda *_: None)
    recs = read_metrics(tmp_path / "gpu")
    for r in recs:
        for k in ("loss", "mlm_loss", "nsp_loss", "grad_norm", "tokens_per_s"):
            assert math.isfinite(r[k]), (k, r)
        assert r["skipped_steps"] == 0, r
    assert recs[-1]["mlm_loss"] < recs[0]["mlm_loss"] - 0.5, (recs[0], recs[-1])
    from bertfast.train.flops import peak_flops

    if peak_flops(torch.cuda.get_device_name(), precision) is not None:
        assert 0 < recs[-1]["mfu"] < 1, recs[-1]
    weights = load_weights(summary["checkpoint"])
    assert all(torch.isfinite(w.float()).all() for w in weights.values())


def test_train_export_hf_loads_in_transformers(run):
    cfg, _, out, export = run
    import transformers

    from bertfast.model.bert import BertConfig, BertForPreTraining

    hf = transformers.BertForPreTraining.from_pretrained(str(export)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(export))
    with open(os.path.join(out, "model_config.json")) as f:
        model = BertForPreTraining(BertConfig.from_dict(json.load(f)), impl="torch")
    ckpt.load_checkpoint(os.path.join(out, "checkpoints", "step_00000024"), model)
    model.eval()
    enc = tok(["the baker sliced a loaf in the kitchen.", "on the third day"],
              ["she sold it at the counter.", "the captain tied a rope"], padding=True, return_tensors="pt")
    assert model.config.vocab_size == hf.config.vocab_size == -(-len(tok) // 8) * 8  # padded to a multiple of 8
    with torch.no_grad():
        theirs = hf(**enc)
        ours = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], unpad=False)
    mask = enc["attention_mask"].bool()
    torch.testing.assert_close(ours.prediction_scores[mask], theirs.prediction_logits[mask], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.seq_relationship_score, theirs.seq_relationship_logits, rtol=1e-4, atol=1e-4)


def test_stop_request_counts_a_quick_repeat_as_one_and_a_later_one_as_abort():
    """The first signal asks for a graceful stop; a repeat within the window (torchrun forwarding the terminal's
    Ctrl-C) is the same request; one after the window aborts at once. Handlers are restored afterwards."""
    from bertfast.train.trainer import _StopRequest

    said = []
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    stop = _StopRequest(said.append, again_after=1.0)
    stop.install()
    try:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
        except KeyboardInterrupt:  # caught here: it would otherwise end the whole pytest session
            pytest.fail("a repeat within the window aborted instead of joining the first request")
        assert stop.signum == signal.SIGTERM and len(said) == 1 and "SIGTERM" in said[0]
        time.sleep(1.1)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    finally:
        stop.restore()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_train_param_groups_and_schedule():
    from bertfast.model.bert import BertConfig, BertForPreTraining

    model = BertForPreTraining(BertConfig.preset("tiny", vocab_size=50, max_len=16))
    decay, no_decay = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert "embed_norm.weight" in nd and "layers.0.attn_norm.weight" in nd and "mlm_bias" in nd
    assert all(n.endswith("bias") or "norm" in n for n in nd)
    d = {names[id(p)] for p in decay["params"]}
    assert "word_embeddings.weight" in d and "layers.1.ffn_in.weight" in d
    assert len(d) + len(nd) == len(names) and no_decay["weight_decay"] == 0.0
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = LinearWarmupDecay(opt, warmup_steps=4, total_steps=10)
    lrs = [sched.get_last_lr()[0]]
    for _ in range(11):
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    assert lrs == pytest.approx([0, 0.25, 0.5, 0.75, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0, 0])


def test_train_bf16_autocast_runs(run, tmp_path):
    cfg, _, out, _ = run
    c = dataclasses.replace(cfg, output_dir=str(tmp_path), max_steps=3, log_every=1, checkpoint_every=0,
                            export_hf=None, tokenizer=os.path.join(out, "tokenizer"), precision="bf16")
    train(c, log=lambda *_: None)
    recs = read_metrics(tmp_path)
    assert all(math.isfinite(r["loss"]) and r["skipped_steps"] == 0 for r in recs)
    w = load_weights(tmp_path / "checkpoints" / ckpt.checkpoint_name(3))
    assert all(v.dtype == torch.float32 for v in w.values())  # autocast leaves the master weights in fp32


def test_training_flops_matches_a_flop_counter():
    """bertfast.train.flops.training_flops against torch's FlopCounterMode on one forward + backward without padding, every
    prediction slot used (so every decoder row is a real prediction)."""
    from torch.utils.flop_counter import FlopCounterMode

    from bertfast.model.bert import BertConfig, BertForPreTraining
    from bertfast.train.flops import training_flops

    cfg = BertConfig.preset("tiny", vocab_size=97, max_len=32)
    model = BertForPreTraining(cfg, impl="torch", unpad=False)
    b, s, p = 3, 24, 5
    ids = torch.randint(5, 97, (b, s))
    pos = torch.stack([torch.randperm(s)[:p] for _ in range(b)])
    with FlopCounterMode(display=False) as fc:
        out = model(ids, torch.ones(b, s, dtype=torch.long), torch.zeros(b, s, dtype=torch.long),
                    next_sentence_label=torch.tensor([0, 1, 0]), mlm_positions=pos,
                    mlm_labels=torch.randint(5, 97, (b, p)))
        out.loss.backward()
    counted = fc.get_total_flops()
    assert counted > 0
    assert abs(training_flops(cfg, b * s, b * s * s, b * p, b) - counted) / counted < 0.01, counted
