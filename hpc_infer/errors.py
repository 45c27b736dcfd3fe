"""The one exception type users see: a message naming the file/line/setting and the fix."""


class UserError(Exception):
    """Bad input or configuration. Printed without a traceback; nothing is submitted."""

    exit_code = 2


class DamagedFile(UserError, ValueError):
    """A file of a run directory that is not what hpc_infer wrote there (not JSON, not the
    shape its reader expects). A ValueError too: readers that skip a half-written file still do."""


class RecordsFailed(UserError):
    """The run finished, but records failed and merge.on_error=fail: results and errors.jsonl
    are written; the command exits 3 so a script notices."""

    exit_code = 3
