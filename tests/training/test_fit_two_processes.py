"""``fit`` across two processes joined by ``jax.distributed`` on 127.0.0.1 (one CPU device
each, a ``data=2`` mesh), as a multi-host run calls it without the ``train/`` scripts.

Opening a ``Checkpointer`` is collective there (orbax's manager meets the other processes
at barriers), so every process must take the same branches on the way to it.
"""

from tests.processes import run_joined

WORKER = """
import json, os, sys
from pathlib import Path
import jax
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import jax.numpy as jnp, numpy as np
from jaxattn.training import optim, sharding
from jaxattn.training.checkpoint import NotWritableError
from jaxattn.training.loop import LoopConfig, fit, make_train_step
from jaxattn.training.state import create_train_state
workdir = Path(sys.argv[3])
if sys.argv[4] == "read-only-metrics":  # a shared metrics.jsonl of another user
    access = os.access  # (root ignores chmod: deny the path as the OS would)
    os.access = lambda path, mode: Path(path) != workdir / "metrics.jsonl" and access(path, mode)
mesh = sharding.make_mesh(-1)
batch_sharding = sharding.batch_sharding(mesh)
optimizer = optim.make_optimizer(1e-2)
loss_fn = lambda params, batch, rng: (jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2), {})
state, state_sharding = sharding.create_sharded(
    lambda: create_train_state({"w": jnp.zeros((3, 1))}, optimizer, jax.random.key(0)), [], mesh
)
step = make_train_step(
    loss_fn, optimizer, state_sharding=state_sharding, batch_sharding=batch_sharding
)
rows = sharding.process_batch_slice(batch_sharding, 4)
x = np.arange(12, dtype=np.float32).reshape(4, 3)
batches = iter(lambda: {"x": x[rows], "y": x[rows, :1]}, None)
loop = LoopConfig(num_steps=3, progress=False)
try:
    result = fit(state, step, batches, workdir=workdir, loop=loop, batch_sharding=batch_sharding)
    print(json.dumps({"step": result.step}))
except NotWritableError as e:
    print(json.dumps({"error": str(e)}))
"""


def run_on_2_processes(workdir, case, timeout=120):
    """Run WORKER in two processes; the last stdout line of each, as JSON."""
    return run_joined(WORKER, 2, 1, str(workdir), case, timeout=timeout)


def test_two_processes_fit_into_a_fresh_workdir(tmp_path):
    """The first process to open the Checkpointer created the checkpoints folder; another
    that looked for it after that opened a read-only Checkpointer the first did not, and
    both failed: 'cannot open the checkpoints ... sync_global_devices name mismatch'."""
    assert run_on_2_processes(tmp_path / "run", "fresh") == [{"step": 3}, {"step": 3}]
    assert (tmp_path / "run" / "checkpoints" / "3").is_dir()
    # Finished: every process peeks at the checkpoint, and nothing is trained again.
    assert run_on_2_processes(tmp_path / "run", "fresh") == [{"step": 3}, {"step": 3}]


def test_every_process_refuses_a_metrics_file_it_cannot_write(tmp_path):
    """Only process 0 checked metrics.jsonl: it stopped with NotWritableError while the
    other waited at orbax's first barrier for it (5 minutes), then died."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text('{"step": 1, "train_loss": 3.0}\n')
    error = {"error": f"cannot write to {workdir / 'metrics.jsonl'}: Permission denied"}
    assert run_on_2_processes(workdir, "read-only-metrics") == [error, error]
    assert not (workdir / "checkpoints").exists()
