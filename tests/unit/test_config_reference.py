"""docs/configuration.md is generated from megavid/config/ (tools/config_reference.py): CI fails
when a config key is added or changed without regenerating it, and the page's rows are checked
against the dataclasses and the source text independently of the generator."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from megavid import config as config_module
from megavid.config import Config, compose, to_dict

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "config_reference.py"
PAGE = REPO / "docs" / "configuration.md"


def _run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def _leaf_fields(cls: type = Config, prefix: str = "") -> list[tuple[str, type, str]]:
    """(dotted key, owning dataclass, field name) of every leaf of the config tree."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _leaf_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", cls, f.name))
    return out


def _docstring_span(lines: list[str], name: str) -> tuple[int, int] | None:
    """First and last line index of the docstring under field ``name``, the first
    ``    name: ...`` definition in ``lines`` (a class's source lines, or the file's from the
    class on), found by reading lines, not a syntax tree: the triple-quoted string starting on
    the line after the definition; None when that line is not a string."""
    j = next(i for i, ln in enumerate(lines) if re.match(rf"^    {name}\s*:", ln))
    # a definition may span lines (a default in brackets): go to its last line
    depth = 0
    while True:
        depth += sum(lines[j].count(c) for c in "([{") - sum(lines[j].count(c) for c in ")]}")
        if depth <= 0:
            break
        j += 1
    j += 1
    if j >= len(lines) or not lines[j].lstrip().startswith('"""'):
        return None
    end = j
    if not lines[j].strip()[3:].endswith('"""'):
        end += 1
        while not lines[end].rstrip().endswith('"""'):
            end += 1
    return j, end


def _source_docstring(cls: type, name: str) -> str:
    """The docstring under field ``name`` of ``cls`` (whitespace collapsed); '' when none."""
    lines = inspect.getsource(cls).splitlines()
    span = _docstring_span(lines, name)
    if span is None:
        return ""
    text = " ".join(ln.strip() for ln in lines[span[0]:span[1] + 1])
    return " ".join(text[3:-3].split())


def _without_docstring(source: str, cls: type, name: str) -> str:
    """``source`` (the text of the config modules) with the docstring under field ``name`` of
    class ``cls`` deleted."""
    lines = source.splitlines(keepends=True)
    start = next(i for i, ln in enumerate(lines) if re.match(rf"class {cls.__name__}\b", ln))
    span = _docstring_span(lines[start:], name)
    assert span is not None, (cls.__name__, name)
    return "".join(lines[:start + span[0]] + lines[start + span[1] + 1:])


def _load_tool():
    """tools/config_reference.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("config_reference_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows() -> dict[str, list[str]]:
    """Dotted key -> the cells of its row in the page's generated reference tables."""
    rows = {}
    text = PAGE.read_text()
    for line in text[text.index("<!-- config-reference:begin"):].splitlines():
        m = re.match(r"^\| `([a-z0-9_.]+)` \|(.*)\|$", line)
        if m:
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", m.group(2))]
            rows[m.group(1)] = cells
    return rows


def test_page_is_up_to_date():
    out = _run_tool("--check")
    assert out.returncode == 0, (
        f"{out.stderr.strip()}\n(run `python tools/config_reference.py` and commit docs/configuration.md)")
    assert out.stdout == "" and out.stderr == ""


def test_every_leaf_key_has_a_row_with_its_default_and_docstring():
    rows = _rows()
    leaves = _leaf_fields()
    assert len(leaves) > 100  # the walk found the whole tree, not one section
    missing = [k for k, _, _ in leaves if k not in rows]
    assert not missing, f"keys without a row in {PAGE}: {missing}"
    assert set(rows) == {k for k, _, _ in leaves}, "rows for keys that do not exist"
    for key, cls, name in leaves:
        _type, default, description = rows[key]
        doc = _source_docstring(cls, name)
        # reST ``code`` is shown as Markdown `code`, pipes escaped
        expected = re.sub(r"``(.+?)``", r"`\1`", doc).replace("|", "\\|")
        assert description == expected, key
    undocumented = [key for key, cls, name in leaves if not _source_docstring(cls, name)]
    assert not undocumented, (
        f"config keys without a docstring in megavid/config/ (write one under each field): "
        f"{undocumented}")


def test_documented_defaults_are_the_defaults_on_the_command_line():
    """Setting every key to the default the page shows, the way a user types it after `key=`,
    composes exactly the config of no overrides at all."""
    rows = _rows()
    reference = to_dict(compose([]))
    tokens = []
    for key, _, _ in _leaf_fields():
        default = rows[key][1]
        assert default.startswith("`") and default.endswith("`"), (key, default)
        tokens.append(f"{key}={default[1:-1]}")
    assert to_dict(compose(tokens)) == reference
    # and the check has teeth: one wrong documented default changes the result
    wrong = [t if not t.startswith("data.batch_size=") else "data.batch_size=33" for t in tokens]
    assert to_dict(compose(wrong)) != reference


def test_types_name_the_allowed_values():
    rows = _rows()
    assert rows["train.precision"][0] == "'bf16' \\| 'fp16' \\| 'fp32'"
    assert rows["data.crop_scale"][0] == "[float, float]"
    assert rows["train.max_steps"][0] == "int" and rows["run.debug"][0] == "bool"


def test_check_fails_on_a_stale_page_and_rewrite_repairs_it(tmp_path):
    page = tmp_path / "configuration.md"
    shutil.copy(PAGE, page)
    fresh = _run_tool("--out", str(page))
    assert fresh.returncode == 0, fresh.stderr
    good = page.read_text()
    page.write_text("\n".join(ln for ln in good.splitlines() if not ln.startswith("| `train.max_steps`"))
                    + "\n")
    out = _run_tool("--check", "--out", str(page))
    assert out.returncode == 1
    assert len(out.stderr.strip().splitlines()) == 1
    assert "stale" in out.stderr and "python tools/config_reference.py" in out.stderr
    assert _run_tool("--out", str(page)).returncode == 0
    assert page.read_text() == good
    assert _run_tool("--check", "--out", str(page)).returncode == 0


@pytest.mark.parametrize("text", ["# Configuration\n\nno markers here\n", ""])
def test_a_page_without_markers_is_refused_in_one_line(tmp_path, text):
    page = tmp_path / "configuration.md"
    page.write_text(text)
    out = _run_tool("--out", str(page))
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and "marker" in out.stderr
    assert page.read_text() == text


def test_a_key_without_a_docstring_fails_the_tool(tmp_path, monkeypatch, capsys):
    """Removing the docstrings of two keys (in two sections) makes the generator refuse to
    write or check the page, with one line naming exactly those keys in page order."""
    tool = _load_tool()
    source = tool.config_source()
    assert tool.undocumented_keys(tool.read_docstrings(source)) == []
    video_cls = typing.get_type_hints(config_module.ModelConfig)["video"]
    mutated = _without_docstring(_without_docstring(source, config_module.TrainConfig, "max_steps"),
                                 video_cls, "depth")
    assert len(mutated.splitlines()) < len(source.splitlines())
    assert tool.undocumented_keys(tool.read_docstrings(mutated)) == ["model.video.depth", "train.max_steps"]
    with pytest.raises(ValueError) as err:
        tool.render_reference(mutated)
    message = str(err.value)
    assert len(message.splitlines()) == 1
    assert "docstring" in message and "model.video.depth, train.max_steps;" in message

    # the command line, on a copy of the page, with the config modules read from the mutated text
    fake = tmp_path / "config.py"
    fake.write_text(mutated)
    monkeypatch.setattr(tool, "config_files", lambda: [fake])
    page = tmp_path / "configuration.md"
    shutil.copy(PAGE, page)
    before = page.read_text()
    capsys.readouterr()
    for args in (["--out", str(page)], ["--check", "--out", str(page)]):
        assert tool.main(args) == 2
        err_text = capsys.readouterr().err
        assert len(err_text.strip().splitlines()) == 1 and "train.max_steps" in err_text
        assert page.read_text() == before
