"""Offline evaluation of the controller on recorded traces: nothing here runs while serving.

- :mod:`controller.offline.replay` streams a trace's thinking through the controller as the server would.
- :mod:`controller.offline.report` aggregates replay results into tables and a figure.
- :mod:`controller.offline.efficiency` scores the solutions a trace reached (outcome and process efficiency).
- :mod:`controller.offline.simulate` records each trace once and simulates policy candidates on it.
- :mod:`controller.offline.calibrate` chooses a policy per model from simulated candidates.

These modules read trace files, tokenizers and figures libraries; the streaming core (``controller/*.py``) and
``server/``'s request path never import them. The calibration file they write is read by
:mod:`controller.calibration`, which is part of the core.
"""
