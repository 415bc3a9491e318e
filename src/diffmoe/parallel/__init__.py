"""Parallelism on ``torch.distributed``: the device mesh, FSDP2, expert parallelism for token choice,
sharded merged experts (etp), distributed checkpoints, and the memory/communication planner."""
