"""Suite-wide settings."""

import os

# A resident Conveyor the user started must not run the tests' commands: each test process
# starts its own (the e2e helpers pass CONVEYOR_TEST_DAEMON_SOCKET on when it is set).
os.environ["CONVEYOR_DAEMON_SOCKET"] = ""
