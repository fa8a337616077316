"""The README's example runs as written, on the tiny Qwen2 (seconds, not the minutes it takes on the real Qwen).

A random tiny model has no induction heads (every head is 'other'), so the example picks two 'other' heads instead;
every other line runs unchanged."""

import re
from pathlib import Path

import headlens

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(monkeypatch, tmp_path):
    (code,) = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    tiny = headlens.tiny_model("qwen2")
    monkeypatch.setattr(headlens, "load_model", lambda *args, **kwargs: tiny)
    monkeypatch.chdir(tmp_path)
    code = code.replace('"induction")', '"other")[:1]').replace("seed=0)", "seed=0, progress=False)")
    # the tiny model's one head has 3 layer-mates: as many distinct layer-matched sets as exist (Qwen's 24: 20)
    code = code.replace("match_layers=True)", "match_layers=True, n_random=3)")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102
    assert scope["induction"] and all(isinstance(h, headlens.Head) for h in scope["induction"])
    table = scope["vs_random"].table
    assert len(table) == 4 and table["heads"][1:].nunique() == 3  # the head + its 3 layer-mates, each once
    assert scope["patched"].clean != scope["patched"].corrupted
    assert (tmp_path / "out" / "qwen" / "report.html").is_file()
