"""The network and its kernels: Granite hybrid, the one kernel choice, SSD, attention, step metadata."""
