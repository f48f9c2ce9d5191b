"""killswitch: cancels every open order on every exchange account; stays tripped."""

__version__ = "0.1.0"
