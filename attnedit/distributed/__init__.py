"""How a conversion is laid out over processes: the parallelism strategy the training loop is handed.

One process by default; ``torchrun --nproc_per_node N -m attnedit convert RECIPE.yaml`` sets the usual
environment variables, :func:`from_env` joins the process group they describe (NCCL on GPUs, gloo on
CPUs) and hands back the FSDP2 strategy. The stages and the loop ask the strategy, never the process
group, what differs.

- :mod:`.strategy`: :class:`Parallelism` (one process) and :class:`FSDP2` (N processes).
- :mod:`.memory`: the one memory model (per stage and process), and fitting a stage to a GPU.
- :mod:`.checkpoint`: one process's atomic ``.pt`` checkpoints; :mod:`.dcp`: sharded DCP ones.
- :mod:`.fsdp`: the FSDP2 plan of the edited model (which modules are units, what is shared).
- :mod:`.data_parallel`: each rank's slice of a batch, metrics averaged over ranks.
- :mod:`.env`: process group, rank and world helpers.
"""

from .strategy import FSDP2, Parallelism, current, from_env

__all__ = ["FSDP2", "Parallelism", "current", "from_env"]
