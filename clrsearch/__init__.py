"""clrsearch: hyperparameter search for cyclic learning-rate schedules.

This package holds what the server and the workers share (the study spec and the
worker protocol) and the command line. The server lives in `service`, the worker in
`worker`.
"""

__version__ = "0.1.0"
