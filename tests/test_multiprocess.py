"""Two training processes on CPU, launched the way users launch sd-scripts on two GPUs.

``accelerate launch --multi_gpu --num_processes 2`` starts two processes through torchrun; on a machine without
GPUs they only form a process group (gloo) when ``ACCELERATE_USE_CPU=1`` is set. Without it each process trains
alone (``DistributedType.NO``, both writing the same files), and ``--cpu --num_processes 2`` starts a single
process (accelerate's simple launcher), as checked by hand with accelerate 1.15.

Each process runs this file as its script (see ``main`` at the bottom): it records, into its own file under
``$PROBE_DIR``, the sha256 of every trained parameter after each optimizer step (a global optimizer step
hook), the images of each batch it trained on, and every file it opened for writing from Python or renamed
under ``$PROBE_ROOT`` (an audit hook: the LoRA files, TensorBoard events and json files; torch.save and
safetensors' own writers work below Python and are not seen); then it runs ``train_network.py`` unchanged (with
``--seed <rank>`` added when a test asks for it). The tests check that

* both ranks hold bit-identical LoRA weights after every step, even when each started from its own ``--seed``,
* the images of an epoch are split between the ranks (each sees half the batches), also without ``--seed``,
* only rank 0 writes the LoRA files, the TensorBoard log and the state folders' json files and renames them
  into place (each rank adds its own RNG state to the state folder, as accelerate does),
* a state saved by two processes resumes in two processes and goes on exactly as the uninterrupted run,
* every run ends: the processes exit (``LAUNCH_TIMEOUT_S``; one once hung at exit in gloo's teardown).

``resume.save_state`` itself is also run on a bare two-process gloo group, with a full disk on one rank.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from safetensors import safe_open

from library import resume
from library.errors import OutputWriteError
from helpers import free_port, skip_without_tensorboard  # tests/helpers.py

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
# the shared workspace (tests/helpers.py): 4 images, 1 repeat: 4 batches per epoch, 2 per rank
STEPS = 4
LAUNCH_TIMEOUT_S = 300


def launch(root: Path, name: str, *extra: str, seed: Literal["config", "drawn", "by rank"] = "config") -> None:
    """``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 <this file> --config_file
    configs/quickstart.toml ...`` on the images in ``root``; probe records go to ``root/probe/<name>``, outputs
    to ``root/out/<name>``. ``seed``: the config's ``seed = 42``, none (a copy of the config without it), or
    ``--seed <rank>`` added by each process (what each one initialises differs)."""
    config = REPO / "configs" / "quickstart.toml"
    if seed == "drawn":
        text = config.read_text(encoding="utf-8")
        assert "\nseed = 42\n" in text
        config = root / f"{name}-without-seed.toml"
        config.write_text(text.replace("\nseed = 42\n", "\n"), encoding="utf-8")
    skip_without_tensorboard(extra)
    probe = root / "probe" / name
    probe.mkdir(parents=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               PROBE_DIR=str(probe), PROBE_ROOT=str(root), PROBE_SEED_BY_RANK="1" if seed == "by rank" else "")
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        __file__,
        "--config_file", str(config),
        "--train_data_dir", str(root / "data"),
        "--output_dir", str(root / "out" / name),
        "--output_name", name,
        "--max_train_steps", str(STEPS),
        "--train_batch_size", "1",
        "--save_model_as", "safetensors",
        *extra,
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{(result.stdout + result.stderr)[-6000:]}"


def records(root: Path, name: str) -> dict[int, list[dict[str, Any]]]:
    """Each rank's probe records, by rank."""
    files = sorted((root / "probe" / name).glob("rank*.jsonl"))
    return {int(f.stem[4:]): [json.loads(line) for line in f.read_text().splitlines()] for f in files}


def of_kind(entries: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [entry for entry in entries if entry["kind"] == kind]


@pytest.fixture(scope="module")
def workspace(make_shape_workspace) -> Path:
    return make_shape_workspace("multiprocess")


@pytest.fixture(scope="module")
def two_process_run(workspace) -> dict[int, list[dict[str, Any]]]:
    """4 steps on 2 processes, LoRA every 2 steps, TensorBoard log; no --seed (the trainer draws one)."""
    # --log_config: the tracker's hparams.yml is a Python-level write the audit sees (the event file is not)
    launch(workspace, "ddp", "--save_every_n_steps", "2", "--logging_dir", str(workspace / "logs"), "--log_config",
           seed="drawn")
    return records(workspace, "ddp")


@pytest.fixture(scope="module")
def state_run(workspace) -> dict[int, list[dict[str, Any]]]:
    """4 steps on 2 processes saving the state every 2 steps (and at the end); each rank with its own --seed."""
    launch(workspace, "state", "--save_every_n_steps", "2", "--save_state", seed="by rank")
    return records(workspace, "state")


@pytest.fixture(scope="module")
def resumed_run(workspace, state_run) -> dict[int, list[dict[str, Any]]]:
    """The state run's step-2 state resumed on 2 processes for the last 2 steps."""
    launch(workspace, "resumed", "--resume", str(workspace / "out" / "state" / "state-step00000002-state"),
           seed="by rank")
    return records(workspace, "resumed")


def test_ranks_hold_identical_weights_after_every_step(two_process_run):
    hashes = {rank: [entry["sha256"] for entry in of_kind(entries, "step")] for rank, entries in two_process_run.items()}
    assert sorted(hashes) == [0, 1]
    assert len(hashes[0]) == STEPS
    assert hashes[0] == hashes[1]
    assert len(set(hashes[0])) == STEPS  # every step moved the weights


def test_each_epoch_is_split_between_the_ranks(two_process_run, workspace):
    """4 batches per epoch: each rank trains on 2 of them, different ones, so 4 steps are 2 epochs."""
    all_images = sorted(str(p) for p in (workspace / "data" / "1_sks shape").glob("*.png"))
    seen = {rank: [entry["images"] for entry in of_kind(entries, "batch")] for rank, entries in two_process_run.items()}
    assert len(seen[0]) == len(seen[1]) == STEPS
    for epoch in range(2):
        rank0 = sum(seen[0][2 * epoch : 2 * epoch + 2], [])
        rank1 = sum(seen[1][2 * epoch : 2 * epoch + 2], [])
        assert sorted(rank0 + rank1) == all_images, f"epoch {epoch + 1}"
    with safe_open(str(workspace / "out" / "ddp" / "ddp.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_num_batches_per_epoch"] == "2"  # per process, as sd-scripts records it
    assert metadata["ss_num_epochs"] == "2"


def test_only_rank_0_writes_the_lora_files_and_the_log(two_process_run, workspace):
    out = workspace / "out" / "ddp"
    assert sorted(p.name for p in out.iterdir()) == ["ddp-step00000002.safetensors", "ddp-step00000004.safetensors",
                                                      "ddp.safetensors"]
    written = {rank: [entry["path"] for entry in of_kind(entries, "write")] for rank, entries in two_process_run.items()}
    assert written[1] == []
    assert {str(out / name) for name in ("ddp-step00000002.safetensors", "ddp.safetensors")} <= set(written[0])
    assert any(path.startswith(str(workspace / "logs")) for path in written[0])
    assert len(list((workspace / "logs").iterdir())) == 1  # one run folder


def test_ranks_start_from_rank_0s_weights_whatever_their_seeds(state_run):
    """Each rank initialises its own LoRA from its own --seed; rank 0's is given to both before the first step
    (as DDP's wrapping does), and they stay identical."""
    hashes = {rank: [entry["sha256"] for entry in of_kind(entries, "step")] for rank, entries in state_run.items()}
    assert len(hashes[0]) == STEPS
    assert hashes[0] == hashes[1]


def test_two_process_state_is_complete_and_only_rank_0_completes_it(state_run, workspace):
    out = workspace / "out" / "state"
    for name in ("state-step00000002-state", "state-step00000004-state", "state-state"):
        files = sorted(p.name for p in (out / name).iterdir())
        assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "random_states_1.pkl",
                "train_state.json", "fingerprint.json"} <= set(files), name
    assert not list(out.glob("*.tmp")) and not list(out.glob("*.old"))
    renamed = {rank: [Path(e["path"]).name for e in of_kind(entries, "write")] for rank, entries in state_run.items()}
    assert renamed[1] == []  # rank 1's only file, its RNG state, is written by torch's C++ writer (not audited)
    assert {"train_state.json", "state-step00000002-state", "state-state"} <= set(renamed[0])
    train_state = json.loads((out / "state-step00000002-state" / "train_state.json").read_text())
    assert train_state == {"current_epoch": 1, "current_step": 2}


def test_two_process_resume_continues_exactly(state_run, resumed_run, workspace):
    """Steps 3 and 4 after resuming give the weights and batches of the uninterrupted run's steps 3 and 4."""
    for rank in (0, 1):
        assert [e["sha256"] for e in of_kind(resumed_run[rank], "step")] == \
            [e["sha256"] for e in of_kind(state_run[rank], "step")][2:]
        assert [e["images"] for e in of_kind(resumed_run[rank], "batch")] == \
            [e["images"] for e in of_kind(state_run[rank], "batch")][2:]


class _GlooAccelerator:
    """What ``resume.save_state`` uses of an ``Accelerator``, over a real two-process gloo group; ``save_state``
    writes this rank's RNG file as accelerate does, or fails with a full disk on ``failing_rank``."""

    num_processes = 2
    device = torch.device("cpu")

    def __init__(self, rank: int, failing_rank: int | None) -> None:
        self.rank, self.failing_rank = rank, failing_rank
        self.is_main_process = rank == 0

    def reduce(self, tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        torch.distributed.all_reduce(tensor)
        return tensor

    def save_state(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        if self.rank == self.failing_rank:
            raise OSError(28, "No space left on device")
        Path(path, f"random_states_{self.rank}.pkl").write_bytes(b"rng")


def _save_state_on_two_ranks(rank: int, port: int, root: str) -> None:
    """Save into ``root/ok-state`` (no failure), then into ``root/full-state`` with rank 1's disk full; write
    what each save did on this rank to ``root/rank<rank>.json``."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                         timeout=datetime.timedelta(seconds=60))  # a rank left waiting fails
    outcomes = []
    try:
        for name, failing_rank in (("ok-state", None), ("full-state", 1)):
            try:
                state = resume.TrainState(epoch=1, step=2)
                resume.save_state(_GlooAccelerator(rank, failing_rank), os.path.join(root, name), state, {"dim": 4})
                outcomes.append("saved")
            except OutputWriteError as error:
                outcomes.append(str(error))
    finally:
        torch.distributed.destroy_process_group()
    Path(root, f"rank{rank}.json").write_text(json.dumps(outcomes), encoding="utf-8")


def test_save_state_on_two_ranks_completes_or_fails_on_every_rank(tmp_path):
    """Both ranks save into the folder the main process prepared, which becomes the state folder; when rank 1's
    disk is full, both ranks raise (neither waits forever for the other) and the previous state is untouched."""
    previous = tmp_path / "full-state"
    previous.mkdir()
    (previous / "train_state.json").write_text("previous", encoding="utf-8")
    torch.multiprocessing.spawn(_save_state_on_two_ranks, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1))

    assert rank0[0] == rank1[0] == "saved"
    assert sorted(p.name for p in (tmp_path / "ok-state").iterdir()) == [
        "fingerprint.json", "random_states_0.pkl", "random_states_1.pkl", "train_state.json"]
    assert json.loads((tmp_path / "ok-state" / "train_state.json").read_text()) == {"current_epoch": 1,
                                                                                    "current_step": 2}
    assert not (tmp_path / "ok-state.tmp").exists()

    failed = f"could not save the training state to {previous}: "
    assert rank1[1] == failed + "[Errno 28] No space left on device; earlier states are unchanged"
    assert rank0[1] == failed + "it failed on another process; earlier states are unchanged"
    assert sorted(p.name for p in previous.iterdir()) == ["train_state.json"]
    assert (previous / "train_state.json").read_text() == "previous"
    assert not (tmp_path / "full-state.tmp").exists()  # the partial write of the failed save is removed


# ---------------------------------------------------------------------- the script each process runs


def _parameters_sha256(optimizer: Any) -> str:
    digest = hashlib.sha256()
    for group in optimizer.param_groups:
        for param in group["params"]:
            digest.update(param.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def main() -> None:
    """Install the probes (see the module docstring), then run ``train_network.py`` with this process's argv."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    import train_network
    from library import trainer

    rank = int(os.environ.get("RANK", "0"))
    root = os.environ["PROBE_ROOT"]
    probes = os.path.join(root, "probe")
    log = open(Path(os.environ["PROBE_DIR"]) / f"rank{rank}.jsonl", "w", encoding="utf-8")  # noqa: SIM115

    def record(**entry: Any) -> None:
        log.write(json.dumps(entry) + "\n")
        log.flush()

    def audit(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], str) and args[0].startswith(root) and not args[0].startswith(probes):
            if os.path.isdir(args[0]):  # an unnamed temporary file in it (the trainer's --output_dir write check)
                return
            if any(c in (args[1] or "") for c in "wax+") or (args[2] or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                record(kind="write", path=args[0])
        elif event == "os.rename" and str(args[1]).startswith(root):
            record(kind="write", path=str(args[1]))

    register_optimizer_step_post_hook(lambda optimizer, *_: record(kind="step", sha256=_parameters_sha256(optimizer)))
    compute_loss = trainer.NetworkTrainer.compute_loss

    def recording_compute_loss(self, batch, *args, **kwargs):
        record(kind="batch", images=list(batch["image_keys"]))
        return compute_loss(self, batch, *args, **kwargs)

    trainer.NetworkTrainer.compute_loss = recording_compute_loss
    torch.set_num_threads(1)
    sys.addaudithook(audit)
    seed = ["--seed", str(rank)] if os.environ["PROBE_SEED_BY_RANK"] else []
    train_network.main(sys.argv[1:] + seed)


if __name__ == "__main__":
    main()
