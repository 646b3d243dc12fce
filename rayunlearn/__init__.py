"""rayunlearn: distributed, Ray-based sweeps for LLM unlearning research built around the
gradient effect (G-effect) of "Rethinking LLM Unlearning Objectives" (ICLR 2025)."""

__version__ = "0.1.0"


class UserError(Exception):
    """An error caused by user input (config, data, names). The CLI prints its message
    without a traceback; the message says what was wrong and what to do."""
