"""How a stage runs: its log file, its device, and its own GPU on a box with several (gpu_slots).

Importing this package (every workflow script does, before torch) sets ``OMP_WAIT_POLICY=PASSIVE``
unless the user set it: OpenMP threads that spin while waiting stall badly on a machine whose cores
other jobs share.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
