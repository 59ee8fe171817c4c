"""SPMD training on 8 simulated CPU devices: every mesh trains like one device.

The devices exist only in a fresh process (``--xla_force_host_platform_device_count``
must be set before JAX starts), so ``mesh_worker.py`` runs in a subprocess.
"""

from pathlib import Path

import jax
import numpy as np
import pytest

from jaxattn.models import gpt
from jaxattn.training.checkpoint import Checkpointer
from jaxattn.training.optim import make_optimizer
from jaxattn.training.state import create_train_state
from tests.processes import run_joined

WORKER = Path(__file__).with_name("mesh_worker.py")


@pytest.fixture(scope="module")
def worker_run(tmp_path_factory, run_on_8_devices):
    out = tmp_path_factory.mktemp("mesh")
    return run_on_8_devices([str(WORKER), str(out)], timeout=900), out


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["8x1x1/accum1", "2x4x1/accum1", "2x2x2/accum1", "2x2x2/accum2"])
def test_every_mesh_trains_like_one_device(worker_run, mesh):
    result, _ = worker_run
    np.testing.assert_allclose(result[mesh]["losses"], result["reference"], rtol=1e-5)
    assert result[mesh]["max_param_diff"] < 1e-5


@pytest.mark.slow
def test_fsdp_and_tensor_axes_really_split_the_weights(worker_run):
    result, _ = worker_run
    # w_q [L=2, D=16, N=4, H=4]: D over fsdp=2, N over tensor=2 -> [2, 8, 2, 4] per device.
    assert result["2x2x2/accum1"]["w_q_spec"] == [None, "fsdp", "tensor"]
    assert result["2x2x2/accum1"]["w_q_shard"] == [2, 8, 2, 4]
    assert result["8x1x1/accum1"]["w_q_shard"] == [2, 16, 4, 4]  # Data parallel: whole.


@pytest.mark.slow
def test_checkpoint_saved_on_8_devices_restores_on_1(worker_run):
    _, out = worker_run
    config = gpt.GPTConfig(
        vocab_size=16, block_size=8, num_layers=2, num_heads=4, embed_dim=16, use_bias=True
    )
    optimizer = make_optimizer(1e-2, weight_decay=0.1, grad_clip=1.0)
    target = jax.eval_shape(
        lambda: create_train_state(
            gpt.init_gpt(jax.random.key(0), config), optimizer, jax.random.key(1)
        )
    )
    with Checkpointer(out / "checkpoints", read_only=True) as ckpt:
        state, meta = ckpt.restore(target)
    assert meta["config"] == "mesh_worker" and int(state.step) == 3
    saved = np.load(out / "params.npz")
    leaves = jax.tree.leaves(state.params)
    assert len(leaves) == len(saved.files)
    for i, leaf in enumerate(leaves):
        assert leaf.sharding.device_set == {jax.devices()[0]}
        np.testing.assert_array_equal(np.asarray(leaf), saved[f"arr_{i}"])


LAYOUT = """
import json, jax, numpy as np
from jaxattn.training import sharding
out = {"meshes": [dict(sharding.make_mesh(*s).shape) for s in ((2, 4, 1), (2, -1, 2), (-1, 1, 4))]}
batch_sharding = sharding.batch_sharding(sharding.make_mesh(2, 2, 2))
placed = sharding.global_batch({"x": np.arange(16).reshape(8, 2)}, batch_sharding)["x"]
out["rows"] = sorted({tuple(np.asarray(s.data)[:, 0].tolist()) for s in placed.addressable_shards})
try:
    sharding.process_batch_slice(batch_sharding, 6)
except ValueError as e:
    out["error"] = str(e)
try:  # as the scripts name it
    sharding.process_batch_slice(batch_sharding, 6, "config.batch_size")
except ValueError as e:
    out["named"] = str(e)
print(json.dumps(out))
"""


def test_mesh_sizes_and_batch_rows_on_8_devices(run_on_8_devices):
    """Each mesh axis gets its own size, and the batch rows split over data x fsdp (4
    groups of 2 rows here), not only over data; a batch that does not split is refused."""
    out = run_on_8_devices(["-c", LAYOUT], timeout=300)
    assert out["meshes"] == [
        {"data": 2, "fsdp": 4, "tensor": 1},
        {"data": 2, "fsdp": 2, "tensor": 2},
        {"data": 2, "fsdp": 1, "tensor": 4},
    ]
    assert out["rows"] == [[0, 2], [4, 6], [8, 10], [12, 14]]
    assert out["error"] == "batch size 6 does not split over data x fsdp = 4 devices"
    assert out["named"] == "config.batch_size 6 does not split over data x fsdp = 4 devices"


ROW_AXES = """
import json
from jax.sharding import NamedSharding, PartitionSpec
from jaxattn.training import sharding
mesh = sharding.make_mesh(2, 2, 2)
rows = sharding.process_batch_slice(NamedSharding(mesh, PartitionSpec("data")), 6)
out = {"data": [rows.start, rows.stop]}
try:
    sharding.process_batch_slice(NamedSharding(mesh, PartitionSpec(sharding.MESH_AXES)), 4)
except ValueError as e:
    out["all"] = str(e)
print(json.dumps(out))
"""


def test_process_batch_slice_splits_the_rows_over_the_axes_of_the_sharding(run_on_8_devices):
    """A batch over data alone (6 rows over data=2, which global_batch places) was refused
    as not splitting over data x fsdp = 4; one over all 8 devices met JAX's own
    IndivisibleError naming neither the batch size nor the axes."""
    out = run_on_8_devices(["-c", ROW_AXES], timeout=300)
    assert out["data"] == [0, 6]
    assert out["all"] == "batch size 4 does not split over data x fsdp x tensor = 8 devices"


IDLE_AXIS = """
import json, warnings, jax
from jaxattn.models import gpt
from jaxattn.models.partitioning import TRANSFORMER_RULES
from jaxattn.training import sharding
out = {}
for heads in (3, 4):  # MLP width = embed_dim = 3 * heads
    config = gpt.GPTConfig(vocab_size=65, block_size=8, num_layers=2, num_heads=heads,
                           embed_dim=3 * heads, mlp_ratio=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, shardings = sharding.create_sharded(
            lambda: gpt.init_gpt(jax.random.key(0), config), TRANSFORMER_RULES,
            sharding.make_mesh(2, 1, 4), abstract=True,
        )
    out[heads] = [str(w.message) for w in caught]
print(json.dumps(out))
"""


def test_a_tensor_axis_that_divides_no_head_mlp_or_vocabulary_size_is_warned_about(
    run_on_8_devices,
):
    """3 heads, MLP width 9 and 65 characters over tensor=4: every weight ran replicated
    over the axis, its 4 devices repeating the same work, without a word at runtime."""
    out = run_on_8_devices(["-c", IDLE_AXIS], timeout=300)
    assert out["3"] == [
        "mesh axis tensor=4 splits no parameter (no heads, kv_heads, mlp, vocab dimension is "
        "a multiple of 4): every parameter is replicated over its devices"
    ]
    assert out["4"] == []  # 4 heads (and MLP width 12) split over tensor=4


INDIVISIBLE_BATCH = """
import json, sys, jax, jax.numpy as jnp, numpy as np
from jaxattn.training import optim, sharding
from jaxattn.training.loop import LoopConfig, fit, make_train_step
from jaxattn.training.state import create_train_state
mesh = sharding.make_mesh(4, 2, 1)
batch_sharding = sharding.batch_sharding(mesh)
out = {}
try:
    sharding.global_batch({"x": np.zeros((6, 3), np.float32)}, batch_sharding)
except ValueError as e:
    out["global_batch"] = str(e)
optimizer = optim.make_optimizer(1e-2)
loss_fn = lambda params, batch, rng: (jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2), {})
state, state_sharding = sharding.create_sharded(
    lambda: create_train_state({"w": jnp.zeros((3, 1))}, optimizer, jax.random.key(0)), [], mesh
)
step = make_train_step(loss_fn, optimizer, state_sharding=state_sharding,
                       batch_sharding=batch_sharding)
batches = iter(lambda: {"x": np.ones((8, 3), np.float32), "y": np.ones((6, 1), np.float32)}, None)
try:
    fit(state, step, batches, workdir=sys.argv[1], loop=LoopConfig(num_steps=2, progress=False),
        batch_sharding=batch_sharding)
except ValueError as e:
    out["fit"] = str(e)
print(json.dumps(out))
"""


def test_a_batch_the_mesh_does_not_divide_is_refused_naming_the_leaf(run_on_8_devices, tmp_path):
    """6 rows over data x fsdp = 8: JAX's own IndivisibleError showed a NamedSharding and a
    shape, naming neither the batch leaf nor the mesh axes that split it."""
    out = run_on_8_devices(["-c", INDIVISIBLE_BATCH, str(tmp_path / "run")], timeout=300)
    assert out["global_batch"] == (
        "global_batch: batch leaf x has 6 rows (shape (6, 3)), which do not split over "
        "data x fsdp = 8 devices"
    )
    assert out["fit"] == (
        "global_batch: batch leaf y has 6 rows (shape (6, 1)), which do not split over "
        "data x fsdp = 8 devices"
    )


TWO_PROCESS_BATCH = """
import json, sys, jax
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import numpy as np
from jaxattn.training import sharding
batch_sharding = sharding.batch_sharding(sharding.make_mesh(2, 2, 2))
out = {"4": list(sharding.global_batch({"x": np.zeros((4, 3))}, batch_sharding)["x"].shape)}
try:
    sharding.global_batch({"x": np.zeros((3, 3))}, batch_sharding)
except ValueError as e:
    out["3"] = str(e)
print(json.dumps(out))
"""


def test_each_process_rows_must_split_over_its_own_batch_shards(tmp_path):
    """Two processes of 4 devices, data x fsdp = 4: each holds 2 of the 4 row blocks, so
    its own rows must split in 2 (3 rows each would make a global batch of 6, which 4
    devices do split unevenly)."""
    outputs = run_joined(TWO_PROCESS_BATCH, 2, 4)
    message = (
        "global_batch: batch leaf x has 3 rows (shape (3, 3)), which do not split over this "
        "process's 2 (of data x fsdp = 4) devices"
    )
    assert outputs == [{"4": [8, 3], "3": message}] * 2


THREE_PROCESS_BATCH = """
import json, sys, jax
jax.distributed.initialize(sys.argv[1], num_processes=3, process_id=int(sys.argv[2]))
import numpy as np
from jax.experimental import multihost_utils
from jaxattn.training import sharding
batch_sharding = sharding.batch_sharding(sharding.make_mesh(2, 1, 3))
rows = sharding.process_batch_slice(batch_sharding, 6)
x = sharding.global_batch({"x": np.arange(6)[rows]}, batch_sharding)["x"]
whole = multihost_utils.process_allgather(x, tiled=True)
print(json.dumps({"rows": [rows.start, rows.stop], "whole": whole.tolist()}))
"""


def test_processes_that_hold_different_numbers_of_row_blocks_assemble_the_batch():
    """Three processes of 2 devices, data=2 x tensor=3: the tensor groups cross the
    processes, so process 1 holds rows of both data blocks and the others one each. JAX
    cannot infer the global shape of such uneven pieces: global_batch failed with "Unable
    to compute global_shape due to non-uniform sharding", naming neither the batch nor
    the mesh, on a mesh that make_mesh and process_batch_slice accepted."""
    got = run_joined(THREE_PROCESS_BATCH, 3, 2)
    assert [g["rows"] for g in got] == [[0, 3], [0, 6], [3, 6]]
    assert all(g["whole"] == list(range(6)) for g in got)
