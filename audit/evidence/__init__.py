"""One module per kind of evidence: ``measure`` a model on probes -> raw numbers.

Each module is named as the rule in :mod:`audit.rules` that judges its numbers.
"""
