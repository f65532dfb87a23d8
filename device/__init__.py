"""pistill.device: runtimes, the on-device agent and latency benchmarks."""
