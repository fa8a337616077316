"""The interventions floor: ablation and pruning (:mod:`.ablation`, :mod:`.prune`) and activation / attribution
patching (:mod:`.patching`, :mod:`.attribution`) — the same swap on the engine with a different source."""
