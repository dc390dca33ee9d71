"""How a stage runs: its log file, its device."""
