"""Parallelism on ``torch.distributed``: the device mesh, FSDP2, expert parallelism for token choice,
Lory's sharded experts, distributed checkpoints, and the memory/communication planner."""
