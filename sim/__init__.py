"""The network simulator and the trace-driven link emulator."""
