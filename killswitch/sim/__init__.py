"""The EMS simulator (`killswitch ems-sim`): a faithful CoinAPI EMS stand-in.

Serve a `Simulator` in-process with `running_simulator`, or as a process with
`run_from_argv`; script faults with its methods or its `/_sim/` control API.
"""

from killswitch.sim.app import create_sim_app, running_simulator
from killswitch.sim.main import run_from_argv
from killswitch.sim.simulator import DEMO_ACCOUNTS, RecordedRequest, Simulator

__all__ = [
    "DEMO_ACCOUNTS",
    "RecordedRequest",
    "Simulator",
    "create_sim_app",
    "run_from_argv",
    "running_simulator",
]
