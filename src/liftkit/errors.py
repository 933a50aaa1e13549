"""Exception types. Every liftkit error carries a one-line message naming the problem and the fix."""


class LiftkitError(Exception):
    """Base class: an input or usage problem the CLI reports as one line with exit code 2."""


class DataError(LiftkitError):
    """A dataset file is missing, corrupt, or has the wrong format."""


class DivergenceError(LiftkitError):
    """Training produced a non-finite loss; the CLI exits with code 1."""


class PeerLostError(LiftkitError):
    """Under torchrun: a collective failed because another process died, hung past ``--dist-timeout``, or could
    not be reached. The CLI reports it as one line and exits with code 1; the last checkpoint is kept."""
