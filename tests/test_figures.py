"""report --plot / --html: the files are produced, complete, self-contained, and refused cleanly."""

import html
import json
import struct
import sys

import pytest
from typer.testing import CliRunner

import sharecompress
from sharecompress.cli import app
from sharecompress.report.figures import MAX_LABELLED_BARS, PLOT_PIXELS, report_image

from factories import random_factors, write_peft_adapter

pytest.importorskip("matplotlib")

MODULES = {"layers.0.q_proj": (16, 12), "layers.1.q_proj": (16, 12), "layers.0.v_proj": (16, 12)}
ODD = 'odd<&>"[red]name'  # names are directory names: any file name (HTML specials, rich markup)
NAMES = ["alpha", "beta", ODD]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
runner = CliRunner()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Three merged adapters and one added after (so one error is exact, the others bounds)."""
    root = tmp_path_factory.mktemp("figures")
    paths = [str(write_peft_adapter(root / "src" / name, random_factors(MODULES, 2, seed=i))) for i, name in enumerate(NAMES)]
    zoo = sharecompress.merge(paths, root / "zoo", k=3)
    zoo.add([str(write_peft_adapter(root / "src" / "late", random_factors(MODULES, 2, seed=9)))])
    return root / "zoo"


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE
    return struct.unpack(">II", data[16:24])


def one_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_plot_and_html_are_written_with_json(zoo, tmp_path):
    plot, page = tmp_path / "zoo.png", tmp_path / "zoo.html"
    plot.write_bytes(b"old")  # an existing file is replaced whole
    result = runner.invoke(app, ["report", "--zoo", str(zoo), "--json", "--plot", str(plot), "--html", str(page)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # stdout stays pure JSON
    data = plot.read_bytes()
    assert png_size(data) == PLOT_PIXELS
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    for adapter in report["adapters"]:
        assert html.escape(adapter["name"]) in text
    assert ODD not in text  # never raw
    error = report["relative_error"]
    assert f"{error:.4g}" in text and repr(error) in text  # shown, and exact as --json prints it
    assert text.count('src="data:image/png;base64,') == 2
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text.lower()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zoo.html", "zoo.png"]  # no temp files left


def test_html_alone_with_the_table(zoo, tmp_path):
    page = tmp_path / "page.html"
    result = runner.invoke(app, ["report", "--zoo", str(zoo), "--html", str(page), "--max-error", "1e-9"])
    assert result.exit_code == 1  # the gate still applies; the page is written first
    assert "sharecompress report" in result.stdout and ODD in result.stdout  # the table, names as they are
    assert page.stat().st_size > 0 and "above --max-error" in page.read_text()


def test_many_adapters_get_a_sorted_profile_not_labelled_bars():
    count = MAX_LABELLED_BARS + 60
    adapters = [{"name": f"a{i:03d}", "relative_error": 0.1 + 0.001 * i, "exact": i % 3 != 0} for i in range(count)]
    modules = {f"l.{i}.{role}": {"shape": [8, 8], "k": 4, "k_u": 4, "k_v": 4, "energy_kept": 0.9,
                                 "energy_curve": [min(1.0, 0.3 * j) for j in range(1, 5)]}
               for i in range(20) for role in ("q", "v")}
    report = {"adapters": adapters, "modules": modules, "relative_error": 0.12, "compression_ratio": 3.0}
    assert png_size(report_image(report, {"modules": modules, "k_rule": {"energy": 0.99}}, max_error=0.15)) == PLOT_PIXELS


def test_plot_without_matplotlib_is_one_line_and_writes_nothing(zoo, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    result = runner.invoke(app, ["report", "--zoo", str(zoo), "--plot", str(tmp_path / "z.png"), "--html", str(tmp_path / "z.html")])
    assert result.exit_code == 2
    assert "report --plot needs matplotlib: pip install 'sharecompress[plot]'" in one_line(result)
    assert list(tmp_path.iterdir()) == []


def test_html_without_matplotlib_keeps_the_tables(zoo, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    page = tmp_path / "z.html"
    result = runner.invoke(app, ["report", "--zoo", str(zoo), "--json", "--html", str(page)])
    assert result.exit_code == 0, result.output
    text = page.read_text()
    assert "<img" not in text and "sharecompress[plot]" in text
    assert all(html.escape(a["name"]) in text for a in json.loads(result.stdout)["adapters"])


def test_a_failed_write_leaves_the_old_file_and_no_temp(zoo, tmp_path, monkeypatch):
    import sharecompress.report.figures as figures

    def full_disk(path, data):
        path.write_bytes(data[:10])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(figures, "write_bytes_durably", full_disk)
    page = tmp_path / "z.html"
    page.write_text("old page")
    result = runner.invoke(app, ["report", "--zoo", str(zoo), "--html", str(page)])
    assert result.exit_code == 2
    assert "No space left on device" in one_line(result)
    assert page.read_text() == "old page" and [p.name for p in tmp_path.iterdir()] == ["z.html"]


@pytest.mark.parametrize("flag", ["--plot", "--html"])
def test_target_in_a_missing_directory_is_refused(zoo, tmp_path, flag):
    target = tmp_path / "missing" / "out.file"
    result = runner.invoke(app, ["report", "--zoo", str(zoo), flag, str(target)])
    assert result.exit_code == 2
    line = one_line(result)
    assert flag in line and "does not exist" in line
    assert list(tmp_path.iterdir()) == []
