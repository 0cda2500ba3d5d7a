"""``make bench``: speed and memory figures printed as ratios measured in one run.

Each section is a module with a ``main()`` that prints its table:
``data`` (benchmark generation), ``methods`` (explainers against one forward +
backward), ``metrics`` (deletion against its forward-pass floor and Quantus).
The machine is noisy: sections report medians of several rounds.
"""
