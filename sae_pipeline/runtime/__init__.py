"""How a stage runs: its log file, its device, and its own GPU on a box with several (gpu_slots)."""
