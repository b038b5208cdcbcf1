"""Measurement outside the numerical core: ``distmlip bench`` (``run``, ``results``), the
structures the commands generate (``systems``: ``bulk:Cu:fcc:3.61``) and result files written
one way (``report``)."""
