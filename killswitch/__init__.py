"""killswitch: cancels every open order on every exchange account, fast, and stays tripped."""

__version__ = "0.1.0"
