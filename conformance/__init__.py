"""The conformance suite: properties and golden cases that check ANY candidate BatchNorm.

Run it with ``pytest conformance --candidate TARGET`` or ``bnspec check TARGET``; both
run these same tests (the CLI drives pytest with bnspec's plugin).
"""
