"""Circuits: how heads work together (issue 26; docs/circuits.md).

- :mod:`~headlens.circuits.graph`: nodes (embed, heads, MLPs, logits) and edges (sender -> receiver q/k/v/mlp/logits);
- :mod:`~headlens.circuits.composition`: Q/K/V composition scores with a random baseline;
- :mod:`~headlens.circuits.paths`: path patching / edge ablation on the intervention-engine pattern;
- :mod:`~headlens.circuits.edges`: EAP and EAP-IG for every edge;
- :mod:`~headlens.circuits.faithfulness`: circuits, faithfulness curves, CPR and CMD;
- :mod:`~headlens.circuits.tasks`: induction, IOI, brackets and user-pair tasks;
- :mod:`~headlens.circuits.study`: :func:`~headlens.circuits.study.find_circuit`, one call from a task to a circuit;
- ``circuit.html`` is drawn by :mod:`headlens.render.circuit`.

Nothing is imported here, so ``import headlens.circuits`` stays light.
"""
