"""The tests start `switchboard serve` through the load tester's ServeProcess (one copy, beside the soak)."""

from switchboard.loadtest.serve_process import STARTUP_TIMEOUT_S, ServeProcess, child_pids, free_port

__all__ = ["STARTUP_TIMEOUT_S", "ServeProcess", "child_pids", "free_port"]
