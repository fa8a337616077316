"""The render floor: CircuitsVis views and heatmaps (:mod:`.viz`), figures of results (:mod:`.plots`), the HTML
report (:mod:`.report`) and the atlas page (:mod:`.atlas`). It draws what lower floors computed."""
