"""The synced check (``bnspec check --world-size K``): :mod:`~bnspec.distributed.ranks`
runs a synced BatchNorm in K processes, :mod:`~bnspec.distributed.check` judges what the
ranks returned against the oracle and builds the results document.

Nothing is imported here: each rank imports :mod:`bnspec.distributed.ranks` alone.
"""
