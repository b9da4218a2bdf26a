"""The rate-distortion benchmark's labels and merged reports."""

import pytest

import benchmarks.rate_distortion as rd
from primis.modelstore import load_model
from tests.conftest import cxr_images


def test_a_model_is_labelled_by_its_name_its_folder_or_the_label_given(tiny_model_dir):
    assert rd.model_label("cxr") == ("cxr", "cxr")
    assert rd.model_label(str(tiny_model_dir)) == (tiny_model_dir.name, str(tiny_model_dir))
    assert rd.model_label(f"mine={tiny_model_dir}") == ("mine", str(tiny_model_dir))


def test_a_merged_report_reuses_the_codec_curves_and_keeps_both_models(tiny_model_dir, monkeypatch):
    first_image, other_image = cxr_images()[:2]
    model = load_model(tiny_model_dir)
    first = rd.measure_source([first_image], {"a": model}, [(2, None)], 0)

    def not_again(*args):
        raise AssertionError("a merged image's codec curves are measured again")

    monkeypatch.setattr(rd, "codec_curve", not_again)
    merged = rd.measure_source([first_image], {"b": model}, [(2, None)], 0, first)
    row, before = merged["images"][0], first["images"][0]
    assert row["codecs"] == before["codecs"]
    assert row["primis"]["a"] == before["primis"]["a"]
    # The same model measured again gives the same key and quality under its new label.
    assert row["primis"]["b"][0]["psnr"] == pytest.approx(before["primis"]["a"][0]["psnr"])
    assert row["primis"]["b"][0]["key_bytes"] == before["primis"]["a"][0]["key_bytes"]
    assert {"a k=2 w=0", "b k=2 w=0"} <= set(merged["summary"])
    with pytest.raises(SystemExit, match="lacks"):
        rd.measure_source([other_image], {"b": model}, [(2, None)], 0, first)
