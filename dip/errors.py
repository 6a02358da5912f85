"""Exception types that the command line reports as one line instead of a traceback.

``UserError`` is for faults of the input, not of the code: a corrupt checkpoint, a run folder that
must not be touched, data that cannot be read, an output that cannot be written. The generic
exceptions a library raises (RuntimeError from torch.load, say) are ambiguous between the two, so
code that knows a failure is the user's converts it into one of these; everything else keeps its
traceback. dip.cli.run_main maps UserError (with ValueError, OSError, KeyError) to exit status 2
and ``TrainingDiverged`` to exit status 3.
"""


class UserError(Exception):
    """A fault of the user's input or environment, reported as one line (exit status 2)."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used: unreadable, corrupt (checksum mismatch) or of another model."""


class RunFolderError(UserError):
    """A run folder that this run must not write into (holds another run, locked, not writable)."""


class DataError(UserError):
    """Training data that cannot be used (no readable image, empty class folders)."""


class OutputWriteError(UserError, OSError):
    """An output file could not be written (disk full, permission denied); the file it would have
    replaced is unchanged."""


class TrainingDiverged(Exception):
    """The loss or gradient norm became NaN or infinite; nothing non-finite was saved (exit status 3)."""
