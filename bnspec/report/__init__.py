"""``bnspec report``'s stages: :mod:`~bnspec.report.run` checks and times each candidate and
keeps what finished, :mod:`~bnspec.report.timing` measures forwards and the machine's copy
bandwidth, :mod:`~bnspec.report.render` turns the results into tables and plots.

Nothing is imported here: the candidates' child processes import
:mod:`bnspec.report.timing` alone, without the report's other machinery.
"""
