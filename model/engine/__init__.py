"""The torch-free engine: loop, scheduler, sequences, handles, prefix cache."""
