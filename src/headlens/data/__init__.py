"""The data floor: license-clean corpora and the deterministic probes (token batches with metadata) scores read.

Importing this package registers the built-in probe kinds, in the order :func:`headlens.data.probes.default_probes`
builds them: ``repeated``, ``natural``, ``delimiter``, ``predicted`` (opt-in: it needs a forward with the
unembedding) and ``code``. The folder also holds the package's data files (``corpus.txt``, the toy checkpoint).
"""

from headlens.data.code import code_probe_builder
from headlens.data.predicted import predicted_probe
from headlens.data.probes import delimiter_text, natural_text, register_probe, repeated_tokens


def _repeated(model, *, seed, n_seqs, seq_len):
    return repeated_tokens(model, n=(seq_len - 1) // 2, n_min=max(2, (seq_len - 1) // 4), n_seqs=n_seqs, seed=seed)


def _natural(model, *, seed, n_seqs, seq_len):
    return natural_text(model, seq_len=seq_len, n_seqs=n_seqs, seed=seed)


def _delimiter(model, *, seed, n_seqs, seq_len):
    return delimiter_text(model, seq_len=seq_len, n_seqs=n_seqs, seed=seed)


for _kind, _builder in (
    ("repeated", _repeated),
    ("natural", _natural),
    ("delimiter", _delimiter),
    ("predicted", predicted_probe),
    ("code", code_probe_builder),
):
    register_probe(_kind, _builder)
