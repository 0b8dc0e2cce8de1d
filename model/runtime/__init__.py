"""The runner: tensors per step, sampling, the state pool, snapshots, decode graphs, block allocator."""
