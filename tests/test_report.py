import importlib
import json
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from headlens import HeadlensError
from headlens.census import CensusResult
from headlens.census.registry import head_types as registered
from headlens.cli import app
from headlens.io import weights_sha256
from headlens.render import viz
from headlens.render.report import label_rows, read_census, write_report

CHROMIUM = "/usr/bin/chromium"
XSS_PROMPT = 'Hi <script>alert(1)</script> and <img src=x onerror="alert(2)"> & </script> done.'
needs_chromium = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason="needs a headless Chromium at /usr/bin/chromium (apt-get install -y chromium)"
)


def fake_census(n_layers=2, n_heads=4, n_kv_heads=2, *, seed=0):
    """A census-shaped table with random scores and labels cycling through every label."""
    rng = np.random.default_rng(seed)
    group = n_heads // n_kv_heads
    rows = [
        {
            "layer": l,
            "head": h,
            "kv_head": h // group,
            **{s: float(rng.random()) for s in viz.SCORES},
            "label": viz.LABELS[(l * n_heads + h) % len(viz.LABELS)],
        }
        for l in range(n_layers)
        for h in range(n_heads)
    ]
    return pd.DataFrame(rows, columns=list(viz.CENSUS_COLUMNS))


def results(census):
    """Result tables shaped like headlens.interventions.ablation / patching / compare / rope output."""
    heads = census[["layer", "head", "kv_head"]]
    n = len(heads)
    ablation = heads.assign(metric=np.linspace(2, 3, n), clean=2.5, effect=np.linspace(-0.5, 0.5, n))
    z = heads.assign(activation="z", metric=np.linspace(0, 1, n), effect=np.linspace(1, -1, n))
    k = pd.DataFrame(
        {
            "activation": "k",
            "layer": [0, 0, 1, 1],
            "head": pd.array([pd.NA] * 4, dtype="Int64"),
            "kv_head": [0, 1, 0, 1],
            "metric": [0.1, 0.2, 0.3, 0.4],
            "effect": [0.5, 0.1, -0.2, 0.0],
        }
    )
    compare = heads.assign(jsd=np.linspace(0, 0.2, n), d_induction=np.linspace(-0.1, 0.1, n), label_changed=False)
    rope = pd.DataFrame(
        [
            {"probe": p, "layer": l, "head": h, "kv_head": h // 2, "distance": d, "attention": 1 / (d + l + 1)}
            for p in ("natural", "constant")
            for l in range(2)
            for h in range(4)
            for d in range(1, 9)
        ]
    )
    return dict(ablation=ablation, patching=pd.concat([z, k], ignore_index=True)[z.columns], compare=compare, rope=rope)


@pytest.fixture(scope="module")
def report(tiny_qwen, tmp_path_factory):
    census = fake_census()
    path = write_report(
        tmp_path_factory.mktemp("report"),
        model=tiny_qwen,
        census=census,
        prompt=XSS_PROMPT,
        heads=[(1, 2), (0, 1)],
        top_k=2,
        **results(census),
    )
    return path, census


# ---------------------------------------------------------------- a headless Chromium over the DevTools pipe


class Chromium:
    """Headless Chromium driven over ``--remote-debugging-pipe`` (NUL-separated JSON on fds 3/4; no extra packages).

    Records every request the page makes (CDP ``Network``), JavaScript dialogs (answered at once),
    console/CSP log entries and uncaught exceptions.
    """

    FLAGS = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--remote-debugging-pipe",
        "--window-size=1280,900",
        "--use-gl=swiftshader",
        "--enable-unsafe-swiftshader",
    ]  # software WebGL: renders CircuitsVis ~5x faster here

    def __init__(self, attempts: int = 3):
        for attempt in range(attempts):
            self._launch()
            try:
                self.send("Browser.getVersion", timeout=30)
                return
            except (OSError, EOFError, TimeoutError) as err:
                self.close()
                if attempt == attempts - 1:
                    raise RuntimeError(f"Chromium did not start: {err}; its stderr: {self.stderr_tail}") from err

    def _launch(self):
        self.profile = tempfile.mkdtemp(prefix="headlens-chromium-")
        to_chrome, self.write_fd = os.pipe()
        self.read_fd, from_chrome = os.pipe()

        def fds_3_and_4():  # os.dup2 makes them inheritable; every other fd of ours is non-inheritable (PEP 446)
            a, b = os.dup(to_chrome), os.dup(from_chrome)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [CHROMIUM, *self.FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            close_fds=False,
            preexec_fn=fds_3_and_4,
            stdout=subprocess.DEVNULL,
            stderr=self.stderr,
        )
        os.close(to_chrome)
        os.close(from_chrome)
        self.buffer, self.next_id, self.session = b"", 0, None
        self.events: list[dict] = []

    def send(self, method, params=None, *, timeout=60):
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if self.session:
            message["sessionId"] = self.session
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == message["id"]:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self._event(reply)

    def _event(self, message):
        if "method" not in message:
            return
        self.events.append(message)
        if message["method"] == "Page.javascriptDialogOpening":
            self.next_id += 1
            os.write(
                self.write_fd,
                json.dumps(
                    {
                        "id": self.next_id,
                        "sessionId": self.session,
                        "method": "Page.handleJavaScriptDialog",
                        "params": {"accept": True},
                    }
                ).encode()
                + b"\0",
            )

    def _read(self, deadline):
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.read_fd], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer")
            chunk = os.read(self.read_fd, 1 << 16)
            if not chunk:
                raise EOFError("Chromium exited")
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(raw)

    def open(self, path: Path) -> None:
        """Load ``path`` in a fresh tab with request/dialog/log recording on; return once it has loaded."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Network", "Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")
        uri = Path(path).resolve().as_uri()
        self.send("Page.navigate", {"url": uri})
        self.wait_for(f"location.href === {json.dumps(uri)} && document.readyState === 'complete'")

    def eval(self, expression):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    def wait_for(self, expression, *, timeout=90):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.eval(expression):
                return
            time.sleep(0.2)
        raise TimeoutError(f"never true in the page: {expression}")

    def requests(self) -> list[str]:
        return [
            e["params"]["request"]["url"] if "request" in e["params"] else e["params"].get("url", "")
            for e in self.events
            if e["method"] in ("Network.requestWillBeSent", "Network.webSocketCreated")
        ]

    def dialogs(self) -> list[str]:
        return [e["params"]["message"] for e in self.events if e["method"] == "Page.javascriptDialogOpening"]

    def problems(self) -> list[str]:
        logs = [
            e["params"]["entry"]["text"]
            for e in self.events
            if e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error"
        ]
        thrown = [json.dumps(e["params"])[:300] for e in self.events if e["method"] == "Runtime.exceptionThrown"]
        return logs + thrown

    def close(self):
        self.proc.kill()
        self.proc.wait()
        self.stderr.seek(0)
        self.stderr_tail = self.stderr.read()[-2000:].decode(errors="replace")
        self.stderr.close()
        os.close(self.write_fd)
        os.close(self.read_fd)
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture
def chromium():
    browser = Chromium()
    yield browser
    browser.close()


def offline(urls):
    return [u for u in urls if not u.startswith(("file:", "data:"))]


def rendered(n: int) -> str:
    """JS: true once the page has loaded and each of its ``n`` CircuitsVis divs holds the component's canvases."""
    return (
        "(() => { const divs = Array.from(document.querySelectorAll('div.circuitsvis')); return document.readyState === 'complete' "
        f"&& divs.length === {n} && divs.every(d => d.querySelector('canvas')); }})()"
    )


COMPONENTS = """Array.from(document.querySelectorAll('div.circuitsvis')).map(d => ({
  id: d.id, canvases: d.querySelectorAll('canvas').length, buttons: Array.from(d.querySelectorAll('button')).map(b => b.textContent),
  injected: d.querySelectorAll('script, img, iframe, object').length, text: d.innerText}))"""


@needs_chromium
def test_harness_sees_requests_and_dialogs(chromium, tmp_path):
    page = tmp_path / "leaky.html"
    page.write_text(
        '<p id="p">hi</p><img src="http://127.0.0.1:9/pixel.png"><script>fetch("https://127.0.0.1:9/x").catch(() => 0);'
        'alert("boom"); document.getElementById("p").textContent = "after";</script>'
    )
    chromium.open(page)
    chromium.wait_for("document.getElementById('p') && document.getElementById('p').textContent === 'after'")
    assert chromium.dialogs() == ["boom"]
    assert {"http://127.0.0.1:9/pixel.png", "https://127.0.0.1:9/x"} <= set(offline(chromium.requests()))


@needs_chromium
def test_report_renders_in_chromium_with_no_network_and_no_script_injection(chromium, report, tiny_qwen):
    path, census = report
    gallery = viz.top_heads_by_label(census, top_k=2)
    labels = list(dict.fromkeys(gallery["label"]))
    chromium.open(path)
    chromium.wait_for(rendered(len(labels) + 1))  # one AttentionHeads per label + the chosen heads' AttentionHeads
    hover_every_chart(chromium, len(labels) + 1)
    components = chromium.eval(COMPONENTS)
    for component, label in zip(components, labels):
        assert component["canvases"] >= 2
        for row in gallery[gallery["label"] == label].itertuples():
            assert f"{viz.head_name(row.layer, row.head)} {row.score:.2f}" in component["text"]  # names from our props
    chosen = components[-1]
    assert "L1H2" in chosen["text"] and "L0H1" in chosen["text"] and "Head 0" not in chosen["text"]
    assert all(c["injected"] == 0 for c in components)
    assert (
        chromium.eval("document.querySelectorAll('#head-view script, #head-view img, #head-view iframe').length") == 0
    )
    assert XSS_PROMPT in chromium.eval("document.getElementById('gallery').innerText")
    assert chromium.dialogs() == []
    assert offline(chromium.requests()) == []
    assert chromium.requests()[0] == path.resolve().as_uri()
    assert chromium.problems() == []
    # the census table sorts on click, numerically, both ways
    column = 1 + list(census.columns).index("induction")  # after the head-name column
    read = f"Array.from(document.querySelectorAll('#census-table tbody tr')).map(r => parseFloat(r.cells[{column}].dataset.v))"
    chromium.eval(f"document.querySelectorAll('#census-table th')[{column}].click()")
    assert chromium.eval(read) == sorted(census["induction"])
    chromium.eval(f"document.querySelectorAll('#census-table th')[{column}].click()")
    assert chromium.eval(read) == sorted(census["induction"], reverse=True)
    chromium.eval(
        "const s = document.querySelector('select[data-filter]'); s.value = 'induction'; s.dispatchEvent(new Event('change'))"
    )
    assert (
        chromium.eval("Array.from(document.querySelectorAll('#census-table tbody tr')).filter(r => !r.hidden).length")
        == (census["label"] == "induction").sum()
    )


def open_head(chromium, name, *, via):
    """Click head ``name`` in the element matching ``via`` and wait for its view: title and a rendered pattern."""
    chromium.eval(
        f"document.querySelector({json.dumps(via + f'[data-head={name!r}]'.replace(chr(39), chr(34)))}).click()"
    )
    chromium.wait_for(
        f"document.getElementById('head-title').textContent.startsWith({json.dumps(name + ':')}) "
        "&& document.querySelector('#head-pattern canvas') !== null",
        timeout=120,
    )


HEAD_NAME = re.compile(r"^L\d+H\d+$")


@needs_chromium
def test_clicking_a_head_opens_its_pattern_and_evidence(chromium, report, tiny_qwen):
    path, census = report
    chromium.open(path)
    chromium.wait_for("document.querySelector('#head-pattern canvas') !== null", timeout=120)
    evidence = results(census)
    for name, via in (
        ("L1H2", ".labelmap td"),
        ("L0H3", "#census-table a"),
        ("L1H0", "#scores td"),
        ("L0H1", "#ablation td"),
    ):
        open_head(chromium, name, via=via)
        layer, head = (int(x) for x in name[1:].split("H"))
        row = census[(census.layer == layer) & (census["head"] == head)].iloc[0]
        assert (
            chromium.eval("document.getElementById('head-title').textContent")
            == f"{name}: {row.label} (kv head {row.kv_head})"
        )
        scores = chromium.eval(
            "Array.from(document.querySelectorAll('#head-scores tbody tr')).map(r => [r.cells[0].textContent, r.cells[1].textContent])"
        )
        # every registered score the table has, in registration order (types that label by another column say which)
        shown = [(t.name if t.column == t.name else f"{t.name} ({t.column})", t.column) for t in registered().values()]
        assert scores == [[name, f"{row[c]:.3f}"] for name, c in shown if c in census.columns]
        # the pattern: CircuitsVis AttentionHeads named after the head, one row of buttons... and the head's own numbers
        assert name in chromium.eval("document.getElementById('head-pattern').innerText")
        shown = chromium.eval(
            "Array.from(document.querySelectorAll('#head-evidence > div')).map(d => [d.querySelector('h4').textContent, "
            "Array.from(d.querySelectorAll('tbody td')).map(c => c.textContent)])"
        )
        sections = dict((title, cells) for title, cells in shown)
        assert set(sections) == {"Ablation", "Activation patching", "Fine-tune comparison"}
        ablated = evidence["ablation"].query("layer == @layer and head == @head").iloc[0]
        assert f"{ablated.effect:.3f}" in sections["Ablation"]
        patched = evidence["patching"].query("layer == @layer and head == @head").iloc[0]
        assert f"{patched.effect:.3f}" in sections["Activation patching"]
    # the pattern the page decodes is the head's pattern on the prompt (to 1/255)
    tokens, patterns = viz.head_patterns(tiny_qwen, XSS_PROMPT, [(0, 1)])
    shown = chromium.eval(
        "(() => { const d = JSON.parse(document.getElementById('head-data').textContent); return d.tokens; })()"
    )
    assert shown == tokens
    # the head picker offers every head by name
    options = chromium.eval("Array.from(document.querySelectorAll('#head-select option')).map(o => o.value)")
    assert options == [viz.head_name(l, h) for l, h in zip(census["layer"], census["head"])]
    assert chromium.problems() == [] and offline(chromium.requests()) == [] and chromium.dialogs() == []
    assert chromium.eval("location.hash") == "#head=L0H1"  # the address now links to the head shown


@needs_chromium
def test_a_link_to_a_head_opens_its_view(chromium, report):
    path, census = report
    chromium.send("Target.createTarget", {"url": "about:blank"})
    target = chromium.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    chromium.session = chromium.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    chromium.send("Page.enable")
    chromium.send("Page.navigate", {"url": path.resolve().as_uri() + "#head=L0H3"})
    chromium.wait_for(
        "document.readyState === 'complete' && document.querySelector('#head-pattern canvas') !== null", timeout=120
    )
    assert chromium.eval("document.getElementById('head-title').textContent").startswith("L0H3: ")


@needs_chromium
def test_every_head_in_the_page_is_named_LxHy(chromium, report):
    path, census = report
    chromium.open(path)
    chromium.wait_for(rendered(len(set(viz.top_heads_by_label(census, top_k=2)["label"])) + 1))
    text = chromium.eval("document.body.innerText")
    assert not re.search(r"\bHead \d", text)
    named = chromium.eval("Array.from(document.querySelectorAll('[data-head]')).map(e => e.dataset.head)")
    assert named and all(HEAD_NAME.match(n) for n in named)
    every = {viz.head_name(l, h) for l, h in zip(census["layer"], census["head"])}
    assert (
        set(chromium.eval("Array.from(document.querySelectorAll('.labelmap td[data-head]')).map(e => e.dataset.head)"))
        == every
    )
    tips = chromium.eval("Array.from(document.querySelectorAll('#scores td[title]')).map(e => e.title)")
    assert len(tips) == len(viz.SCORES) * len(census) and all(re.match(r"^L\d+H\d+ \w+ = -?\d", t) for t in tips)


EVIL_TOKENS = [
    '<img src=x onerror="alert(1)">',
    "<script>alert(2)</script>",
    " a & b",
    "</script><script>alert(3)</script>",
]


def hover_every_chart(chromium, n):
    """Move the mouse over the last canvas (the zoomed chart) of each component, below its diagonal, to raise tooltips."""
    for i in range(n):
        x, y = (
            chromium.eval(f"""(() => {{ const cs = document.querySelectorAll('div.circuitsvis')[{i}].querySelectorAll('canvas');
            const c = cs[cs.length - 1]; c.scrollIntoView(); const r = c.getBoundingClientRect();
            return [r.x + r.width * 0.3, r.y + r.height * 0.7]; }})()""")
        )
        chromium.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})
    time.sleep(0.5)


@needs_chromium
def test_notebook_html_renders_offline_and_tokens_stay_text(chromium, tiny_qwen, tmp_path):
    pattern = torch.tril(torch.ones(4, 4))
    pattern = (pattern / pattern.sum(-1, keepdim=True)).unsqueeze(0)
    views = viz.ViewSet(
        [
            viz.attention_view(tiny_qwen, "<b>bold</b> a b a b", [(0, 0), (1, 3)]),
            viz.CircuitsVisView("AttentionHeads", viz.view_props(EVIL_TOKENS, pattern, names=["<i>x</i>"])),
            viz.CircuitsVisView("AttentionPatterns", viz.view_props(EVIL_TOKENS, pattern, component="patterns")),
        ]
    )
    page = tmp_path / "cell.html"
    viz.reset_notebook_bundle()
    page.write_text(f'<!DOCTYPE html><meta charset="utf-8"><body>{views._repr_html_()}</body>', encoding="utf-8")
    chromium.open(page)
    chromium.wait_for(rendered(3))
    hover_every_chart(chromium, 3)
    components = chromium.eval(COMPONENTS)
    assert "L0H0" in components[0]["text"] and "L1H3" in components[0]["text"]
    assert "<i>x</i>" in components[1]["text"]  # React writes head names as text
    assert [b.replace("\xa0", " ") for b in components[2]["buttons"]] == EVIL_TOKENS
    assert all(c["injected"] == 0 for c in components) and chromium.dialogs() == []
    assert offline(chromium.requests()) == [] and chromium.problems() == []


# ---------------------------------------------------------------- the page itself


def test_report_files(report):
    path, census = report
    assert path.name == "report.html"
    assert not (
        path.parent / "census.csv"
    ).exists()  # the report writes the page and its figures; census.csv is the CLI's
    figures = sorted(p.name for p in (path.parent / "figures").iterdir())
    assert figures == [
        "ablation.png",
        "census_scores.png",
        "compare.png",
        "head_labels.png",
        "patching.png",
        "rope_attention_by_distance.png",
    ]
    assert all((path.parent / "figures" / f).read_bytes()[:4] == b"\x89PNG" for f in figures)


def test_bundle_is_inlined_once_and_no_script_can_be_closed_early(report):
    text = report[0].read_text(encoding="utf-8")
    assert text.count(viz.bundle_js()[:400]) == 1
    assert text.count("var CircuitsVis=") == 1
    n_views = len(set(viz.top_heads_by_label(report[1], top_k=2)["label"])) + 1
    assert text.count("CircuitsVis.render(") == n_views + 1  # + the head view's, rendered on demand
    # five script elements (bundle, render calls, head data JSON, head view, table sorting); nothing inside can end one early
    assert text.replace(viz.bundle_js(), "").count("<script") == 5
    assert len(re.findall("</script", text, flags=re.IGNORECASE)) == 5
    assert "<!--" not in text


def test_no_external_url_of_any_kind(report):
    text = report[0].read_text(encoding="utf-8")
    own = text.replace(viz.bundle_js(), "")  # the bundle's source mentions URLs in comments/strings, never loads them
    links = re.findall(r'(?:src|href|action|srcset|poster)\s*=\s*"([^"]*)"', own, flags=re.IGNORECASE)
    assert links and all(link.startswith(("data:image/png;base64,", "#")) for link in links)
    text_only = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", own)
    assert not re.search(r"https?:|ftp:|wss?:|//[a-z0-9]|url\(|@import", text_only, flags=re.IGNORECASE)
    assert "default-src 'none'" in own


def test_prompt_is_escaped_in_the_html(report):
    text = report[0].read_text(encoding="utf-8")
    assert XSS_PROMPT not in text and "<img src=x" not in text
    assert (
        "Hi &lt;script&gt;alert(1)&lt;/script&gt; and &lt;img src=x onerror=&quot;alert(2)&quot;&gt; &amp; &lt;/script&gt; done."
        in text
    )


def test_direction_controls_in_the_prompt_are_written_out(tiny_qwen, tmp_path):
    census = fake_census()
    prompt = "total = price \u202e* tax\u202c then \u2067rtl\u2069 end"
    path = write_report(tmp_path, model=tiny_qwen, census=census, prompt=prompt, heads=[(1, 2)], top_k=1)
    text = path.read_text(encoding="utf-8")
    assert not viz.DIRECTION_CONTROLS.search(text)
    assert "total = price &lt;U+202E&gt;* tax&lt;U+202C&gt; then &lt;U+2067&gt;rtl&lt;U+2069&gt; end" in text


def test_label_counts():
    n = len(viz.LABELS)
    census = fake_census(2, n, 1)  # labels cycle: two heads of each
    counts = label_rows(CensusResult.from_table(census), top_k=1)
    assert counts["label"].tolist() == list(viz.LABELS)
    assert counts["heads"].tolist() == [2] * n and counts["share"].tolist() == pytest.approx([1 / n] * n)
    best = census[census["label"] == "induction"].sort_values("induction").iloc[-1]
    assert (
        counts.loc[list(viz.LABELS).index("induction"), "top heads"]
        == f"L{best['layer']}H{best['head']} ({best['induction']:.2f})"
    )
    assert counts.loc[n - 1, "top heads"] == ""


def test_report_is_deterministic(report, tiny_qwen, tmp_path):
    path, census = report
    again = write_report(
        tmp_path, model=tiny_qwen, census=census, prompt=XSS_PROMPT, heads=[(1, 2), (0, 1)], top_k=2, **results(census)
    )
    assert again.read_bytes() == path.read_bytes()


def test_write_report_bad_input(tiny_qwen, tmp_path):
    census = fake_census()
    with pytest.raises(HeadlensError, match="lacks columns"):
        write_report(tmp_path, model=tiny_qwen, census=census.drop(columns="label"))
    with pytest.raises(HeadlensError, match="does not match this model"):
        write_report(tmp_path, model=tiny_qwen, census=fake_census(3, 4, 2))
    with pytest.raises(HeadlensError, match="ablation must be a pandas DataFrame"):
        write_report(tmp_path, model=tiny_qwen, census=census, ablation={"layer": [0]}, figures=False)
    with pytest.raises(HeadlensError, match="the patching table is empty"):
        write_report(tmp_path, model=tiny_qwen, census=census, patching=census.head(0), figures=False)
    with pytest.raises(HeadlensError, match="is a file"):
        (tmp_path / "f").write_text("x")
        write_report(tmp_path / "f", model=tiny_qwen, census=census)
    with pytest.raises(HeadlensError, match="no census table"):
        read_census(tmp_path / "missing.csv")


def test_write_report_checks_weights_and_heads_before_writing(tiny_qwen, tmp_path):
    census = fake_census()
    other = CensusResult.from_table(census, provenance={"model": "tiny-llama", "weights": "0" * 64})
    with pytest.raises(HeadlensError, match=r"computed on other weights \(tiny-llama, sha256 000000000000\.\.\.\)"):
        write_report(tmp_path / "other", model=tiny_qwen, census=other)
    for heads, message in (([(9, 9)], "head L9H9 is out of range"), ([(0, 1), "0.1"], "head L0H1 is given twice")):
        with pytest.raises(HeadlensError, match=message):
            write_report(tmp_path / "heads", model=tiny_qwen, census=census, heads=heads)
    assert not (tmp_path / "other").exists() and not (tmp_path / "heads").exists()
    mine = CensusResult.from_table(census, provenance={"model": "tiny-qwen2", "weights": weights_sha256(tiny_qwen)})
    path = write_report(tmp_path / "mine", model=tiny_qwen, census=mine, heads="L1H2", figures=False, progress=False)
    assert "Chosen heads" in path.read_text()


# ---------------------------------------------------------------- CLI


def test_cli_report_reuses_census_csv(tmp_path, monkeypatch):
    def no_census(*args, **kwargs):
        raise AssertionError("the census ran although census.csv exists")

    monkeypatch.setattr(importlib.import_module("headlens.census"), "run_census", no_census)
    from headlens import io, load_model
    from headlens.cli import _census_settings

    census = fake_census()
    io.write_csv(
        census, tmp_path / "census.csv", provenance=io.provenance(load_model("tiny-qwen2"), **_census_settings(0))
    )
    result = CliRunner().invoke(app, ["report", "--model", "tiny-qwen2", "--out", str(tmp_path), "--heads", "1.2,0.3"])
    assert result.exit_code == 0, result.output
    assert f"wrote {tmp_path / 'report.html'}" in result.output
    text = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "L1H2, L0H3 on the prompt above." in text
    assert "the default census probes (as its provenance records)" in text and "not recorded" not in text
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "census.csv"), census)
    # another seed, or a census.csv without provenance (e.g. made for another model): never reused
    for args in (["--seed", "1"], []):
        if not args:
            io.sidecar(tmp_path / "census.csv").unlink()
        result = CliRunner().invoke(app, ["report", "--model", "tiny-qwen2", "--out", str(tmp_path), *args])
        assert "the census ran" in str(result.exception) and "recomputing the census" in result.output


def test_cli_report_runs_the_census_when_missing(tmp_path):
    from headlens import tiny_model
    from headlens.census.run import run_census

    result = CliRunner().invoke(app, ["report", "--model", "tiny-qwen2", "--out", str(tmp_path / "new")])
    assert result.exit_code == 0, result.output
    written = read_census(tmp_path / "new" / "census.csv")
    pd.testing.assert_frame_equal(
        written, run_census(tiny_model("qwen2"), progress=False).table, check_exact=False, rtol=0, atol=1e-12
    )
    bad = CliRunner().invoke(app, ["report", "--model", "tiny-qwen2", "--out", str(tmp_path), "--heads", "1:2"])
    assert isinstance(bad.exception, HeadlensError) and "bad head '1:2'" in str(bad.exception)


# ---------------------------------------------------------------- real Qwen


@pytest.mark.slow
@needs_chromium
def test_qwen_report_renders(qwen, tmp_path, chromium):
    census = fake_census(24, 14, 2)
    path = write_report(tmp_path, model=qwen, census=census, heads=[(5, 3)], figures=False)
    n_labels = len(set(viz.top_heads_by_label(census, top_k=3)["label"]))  # one gallery view per label with heads
    chromium.open(path)
    chromium.wait_for(rendered(n_labels + 1), timeout=180)
    components = chromium.eval(COMPONENTS)
    assert len(components) == n_labels + 1 and all(c["canvases"] >= 2 for c in components)
    assert "L5H3" in components[-1]["text"]
    assert offline(chromium.requests()) == [] and chromium.problems() == []
    open_head(chromium, "L23H13", via=".labelmap td")
    assert chromium.eval("document.getElementById('head-title').textContent").startswith("L23H13: ")


def test_head_view_opens_on_the_top_labelled_head_by_default(tiny_qwen, tmp_path):
    census = fake_census()
    path = write_report(tmp_path, model=tiny_qwen, census=census, figures=False, progress=False)
    data = json.loads(
        re.search(r'<script type="application/json" id="head-data">(.*?)</script>', path.read_text()).group(1)
    )
    best = viz.top_heads_by_label(census, top_k=1).iloc[0]
    assert data["first"] == viz.head_name(best["layer"], best["head"])
    assert set(data["heads"]) == {viz.head_name(l, h) for l, h in zip(census["layer"], census["head"])}


def test_a_rewritten_report_leaves_no_figure_of_the_earlier_one(tiny_qwen, tmp_path):
    census = fake_census()
    write_report(tmp_path, model=tiny_qwen, census=census, top_k=1, progress=False)
    drawn = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert drawn and (tmp_path / "report_files.json").is_file()
    (tmp_path / "figures" / "mine.png").write_bytes(b"the user's")
    write_report(tmp_path, model=tiny_qwen, census=census, top_k=1, progress=False, figures=False)
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["mine.png"]  # figures of another run: gone
