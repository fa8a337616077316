"""The analysis floor: studies built on the census — base vs fine-tune (:mod:`.compare`), several models side by
side (:mod:`.atlas`) and the toy model trained here (:mod:`.toy`)."""
