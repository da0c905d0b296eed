"""What the gate does for its users, without Flask: the API's routes, the reviewer pages and the ``ftgate``
commands all call these functions, so each rule is written once and holds whichever door a request came in
by. A function takes a database session and the acting principal (or ``SYSTEM`` for an operator at the
gate's own shell), and refuses with ``ApiError`` (status, reason, message, field), which the API turns into
its error body and the commands into one line on stderr.
"""
