"""The commands of ``bnspec`` (:mod:`bnspec.cli` parses the command line and dispatches):
:mod:`~bnspec.commands.check` (one target; its :func:`~bnspec.commands.check.check` is the
one seam between the commands and the suite), :mod:`~bnspec.commands.report` (several
candidates, checked and timed) and :mod:`~bnspec.commands.list`.
"""
