"""The one exception type users see: a message naming the file/line/setting and the fix."""


class UserError(Exception):
    """Bad input or configuration. Printed without a traceback; nothing is submitted."""
