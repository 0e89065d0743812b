"""Every user-caused failure is one EdgeVLMError line naming the file; a few through the CLI too."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from edgevlm.errors import EdgeVLMError
from edgevlm.io import dicom as dicom_io
from edgevlm.io import list_series, load_study

from .conftest import PHI


def one_line_error(path, **kwargs) -> str:
    with pytest.raises(EdgeVLMError) as err:
        load_study(path, **kwargs)
    msg = str(err.value)
    assert "\n" not in msg and "Traceback" not in msg
    for value in PHI.values():
        assert value not in msg
    return msg


def test_not_a_dicom_file(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("not an image")
    assert "not a DICOM file" in one_line_error(p)


def test_truncated_pixel_data(tmp_path, make_series):
    _, paths = make_series(tmp_path, n=3, rows=64, cols=64)
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) - 3000])
    msg = one_line_error(tmp_path)
    assert "truncated or corrupt" in msg and paths[1].name in msg


def test_truncated_header(tmp_path, make_series):
    _, paths = make_series(tmp_path, n=3)
    paths[0].write_bytes(paths[0].read_bytes()[:300])
    msg = one_line_error(tmp_path)
    assert "truncated or corrupt" in msg and paths[0].name in msg


def test_no_pixel_data(tmp_path, make_series):
    make_series(tmp_path, n=3, with_pixels=False)
    assert "no pixel data" in one_line_error(tmp_path)


def test_non_image_dicom_file(testdata):
    assert "no pixel data" in one_line_error(testdata("rtplan.dcm"))


def test_single_2d_slice(tmp_path, make_series):
    _, paths = make_series(tmp_path, n=1)
    assert "single 2D image" in one_line_error(tmp_path)
    assert "single 2D image" in one_line_error(paths[0])


def test_uneven_spacing(tmp_path, make_series):
    make_series(tmp_path, positions=[(0.0, 0.0, z) for z in (0.0, 1.0, 2.0, 5.0)])
    assert "uneven slice spacing" in one_line_error(tmp_path)


def test_compressed_without_decoder(testdata):
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEG2000Lossless

    if get_decoder(JPEG2000Lossless).is_available:
        pytest.skip("a JPEG 2000 decoder is installed here")
    assert "pip install edgevlm[jpeg]" in one_line_error(testdata("emri_small_jpeg_2k_lossless.dcm"))


def test_empty_folder(tmp_path):
    assert "the folder is empty" in one_line_error(tmp_path)


def test_folder_without_dicom(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.png").write_bytes(b"\x89PNG")
    assert "2 files, none of them DICOM" in one_line_error(tmp_path)


def test_missing_path(tmp_path):
    assert "no such file or folder" in one_line_error(tmp_path / "nope")


def test_several_series_no_selection(tmp_path, make_series):
    make_series(tmp_path / "x", n=4)
    make_series(tmp_path / "y", n=4)
    assert "equally good candidates" in one_line_error(tmp_path)


def test_memory_budget_checked_before_decoding(tmp_path, make_series, monkeypatch):
    make_series(tmp_path, n=4, rows=8, cols=6)

    def no_decode(*a, **k):
        raise AssertionError("pixels decoded before the budget check")

    monkeypatch.setattr(dicom_io, "_decode", no_decode)
    msg = one_line_error(tmp_path, max_voxels=100)
    assert "4 x 8 x 6 = 192 voxels exceeds the memory budget of 100" in msg


# --- PHI ----------------------------------------------------------------------------------------------


def test_no_identifier_leaves_the_loader(tmp_path, make_series):
    make_series(tmp_path / "ct", n=4)
    make_series(tmp_path / "mr", n=3, modality="MR")
    v = load_study(tmp_path)
    texts = [repr(v), str(v.geometry()), repr(list_series(tmp_path))]
    result = CliRunner().invoke(_app(), ["studies", "ls", str(tmp_path)])
    assert result.exit_code == 0, result.output
    texts.append(result.output)
    json_result = CliRunner().invoke(_app(), ["studies", "ls", "--json", str(tmp_path)])
    texts.append(json_result.output)
    for text in texts:
        for value in PHI.values():
            assert value not in text
            assert value.split("^")[0] not in text


# --- CLI ----------------------------------------------------------------------------------------------


def _app():
    from edgevlm.cli import app

    return app


def cli_error(*args: str) -> str:
    result = CliRunner().invoke(_app(), ["studies", "ls", *args])
    assert result.exit_code == 2, result.output
    out = result.output.strip()
    assert out.count("\n") == 0, out
    assert "Traceback" not in out and out.startswith("edgevlm: error:")
    return out


def test_cli_ls_lists_and_marks_the_default(tmp_path, make_series):
    make_series(tmp_path / "ct", n=4, description="lung")
    make_series(tmp_path / "mr", n=3, modality="MR", description="brain")
    infos = list_series(tmp_path)
    result = CliRunner().invoke(_app(), ["studies", "ls", str(tmp_path)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert f"*{infos[0].series_id}" in result.output and infos[1].series_id in result.output
    import json

    rows = json.loads(CliRunner().invoke(_app(), ["studies", "ls", "--json", str(tmp_path)]).output)
    assert [r["default"] for r in rows] == [True, False]


def test_cli_empty_folder(tmp_path):
    assert "the folder is empty" in cli_error(str(tmp_path))


def test_cli_not_dicom(tmp_path):
    p = tmp_path / "x.txt"
    p.write_text("hello")
    assert "not a DICOM file" in cli_error(str(p))


def test_cli_truncated_header(tmp_path, make_series):
    _, paths = make_series(tmp_path, n=3)
    paths[0].write_bytes(paths[0].read_bytes()[:300])
    assert "truncated or corrupt" in cli_error(str(tmp_path))


def test_cli_missing_path(tmp_path):
    assert "no such file or folder" in cli_error(str(tmp_path / "missing"))


def test_pixels_are_float32_even_for_large_values(tmp_path, make_series):
    make_series(tmp_path, n=3, slope=0.5, intercept=0.0)
    assert load_study(tmp_path).array.dtype == np.float32
