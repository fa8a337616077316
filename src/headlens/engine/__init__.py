"""The engine floor: how a model is run — pattern capture (:mod:`.capture`), the one intervention engine
(:mod:`.intervene`: sites x sources, restarts at the first touched layer, stacked runs) and where shards run
(:mod:`.executor`: in this process or on Ray actors)."""
