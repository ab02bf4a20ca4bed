"""What the command-line entries share: a failure told in one line, its traceback kept in a log.

``python -m streamml.register`` and ``python -m streamml.serve`` print ``error: <cause>
(traceback in <log>)`` on stderr and exit 1; whoever debugs it reads the log. (``python -m
streamml.train`` does the same with Hydra's ``train.log``.) Standard library only.
"""

from __future__ import annotations

import traceback
from pathlib import Path


def one_line_failure(err: BaseException, log_file: Path) -> str:
    """Append the traceback of ``err`` (being handled) to ``log_file``; return the line for stderr.

    >>> import tempfile
    >>> log = Path(tempfile.mkdtemp()) / "outputs" / "x.log"
    >>> try:
    ...     raise LookupError("no run 'abc'\\nsecond line")
    ... except LookupError as err:
    ...     one_line_failure(err, log) == f"error: no run 'abc' (traceback in {log})"
    True
    >>> "Traceback" in log.read_text()
    True
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("a") as f:
        f.write("".join(traceback.format_exception(err)))
    cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"error: {cause} (traceback in {log_file})"
