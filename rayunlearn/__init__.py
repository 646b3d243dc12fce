"""rayunlearn: distributed, Ray-based sweeps for LLM unlearning research built around the
gradient effect (G-effect) of "Rethinking LLM Unlearning Objectives" (ICLR 2025)."""

import logging

__version__ = "0.1.0"

# transformers imports torchao (the attacks' quantizer) whenever it is installed; on a CPU build
# torchao then logs a warning per CUDA-only kernel it cannot load and torch one per Enum it
# registers: noise in every run's log, silenced before anything imports transformers
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


class UserError(Exception):
    """An error caused by user input (config, data, names). The CLI prints its message
    without a traceback; the message says what was wrong and what to do."""
