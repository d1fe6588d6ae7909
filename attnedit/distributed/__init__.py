"""Running one recipe on N processes with PyTorch's own engine (torchrun, FSDP2, DCP).

``torchrun --nproc_per_node N -m attnedit convert RECIPE.yaml`` sets the usual environment variables;
:func:`env.init_from_env` turns them into a process group (NCCL on GPUs, gloo on CPUs). Without them
nothing here is active and every helper is a no-op for one process.

- :mod:`.env`: process group, rank and world helpers.
- :mod:`.fsdp`: the FSDP2 plan of the edited model (which modules are units, what is shared).
- :mod:`.data_parallel`: how a stage's job runs on N ranks (data split, reduced metrics).
- :mod:`.checkpoint`: sharded, atomic DCP checkpoints and their conversion to a Hugging Face folder.
- :mod:`.memory`: the per-GPU memory plan for a world size, and the smallest GPU count that fits.
"""

from .env import barrier, broadcast_object, init_from_env, is_distributed, is_main, rank, shutdown, world_size

__all__ = ["barrier", "broadcast_object", "init_from_env", "is_distributed", "is_main", "rank", "shutdown", "world_size"]
