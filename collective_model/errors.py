"""Exceptions the CLI maps to exit codes, and the codes themselves."""

# Exit codes of every `collective` command. 2 is click's own code for usage errors.
EXIT_OK = 0
EXIT_FAILURE = 1  # a run or command failed (data not found, store error, ...)
EXIT_USAGE = 2  # invalid config, option, sweep file or argument; nothing was written
EXIT_DIVERGED = 3  # training stopped on a non-finite loss; the run is recorded as failed
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT); the run is recorded as killed


class CollectiveError(Exception):
    """An expected failure with a message for the user; the CLI prints it without a traceback."""

    exit_code = EXIT_FAILURE


class DataNotFoundError(CollectiveError):
    """No valid copy of a dataset was found and none could be downloaded."""


class NonFiniteLossError(CollectiveError):
    """The training loss became NaN or infinite."""

    exit_code = EXIT_DIVERGED

    def __init__(self, epoch: int, step: int, value: float):
        self.epoch, self.step, self.value = epoch, step, value
        super().__init__(
            f"training diverged: non-finite loss ({value}) at epoch {epoch}, step {step}; "
            "try a lower learning_rate"
        )
