"""The device-mesh settings every training config carries (``config.mesh``); not a run config.

The product of the three sizes is the number of devices (of all processes together);
one size may be -1 for "all the devices the others leave". See
``jaxattn/training/sharding.py`` for what each axis splits.

    --config.mesh.data=2 --config.mesh.fsdp=2 --config.mesh.tensor=2
"""

import ml_collections


def mesh_config(data: int = -1, fsdp: int = 1, tensor: int = 1) -> ml_collections.ConfigDict:
    mesh = ml_collections.ConfigDict()
    mesh.data = data  # Data parallel: batch rows split, parameters replicated.
    mesh.fsdp = fsdp  # Fully sharded data parallel: batch rows and large matrices split.
    mesh.tensor = tensor  # Tensor parallel: heads, MLP width and vocabulary split.
    return mesh
