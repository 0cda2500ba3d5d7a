"""The evidence rules: each kind of evidence turns raw numbers into checks; one rule combines them.

=================  ==========================================================
module             evidence
=================  ==========================================================
``behaviour``      context gaps within classes (groups, paired or not), competence
``pairs``          flip rate of counterfactual pairs
``synthesized``    counterfactuals the gate builds from the masks
``attribution``    relevance outside the object masks
``faithfulness``   deletion curves against a reference (filter)
``sanity``         maps against a randomized model's (filter)
``clusters``       SpRAy clusters of the maps (labels only, for review)
``concepts``       TCAV along the groups' contexts (informs, never votes)
``dissection``    units of a layer that respond to the context (informs, never votes)
``combine``        the combination rule: :func:`decide`
=================  ==========================================================
"""

from audit.rules.base import Check, Outcome
from audit.rules.combine import decide

__all__ = ["Check", "Outcome", "decide"]
