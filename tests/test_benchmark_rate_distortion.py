"""The rate-distortion benchmark's labels and merged reports."""

import math

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


def test_reports_of_different_sources_combine_into_one_compact_table(tiny_model_dir):
    first_image, other_image = cxr_images()[:2]
    model = load_model(tiny_model_dir)

    def report(source: str, image, label: str) -> dict:
        result = rd.measure_source([image], {label: model}, [(2, None)], 0)
        return {
            "machine": {"cpu": source},
            "refine_steps": 0,
            "models": {label: model.hash},
            "refine_steps_by_model": {label: 0},
            "sources": {source: result},
        }

    one, two = report("cxr-test", first_image, "a"), report("dicom", other_image, "a")
    both = rd.combined([one, two])
    assert both["sources"]["dicom"] == {
        "image_count": 1,
        "summary": two["sources"]["dicom"]["summary"],
    }
    assert both["models"] == {"a": model.hash} and len(both["machines"]) == 2
    table = rd.markdown(both)
    assert "| cxr-test (1) | `a` | 0 |" in table and "| dicom (1) | `a` | 0 |" in table
    assert table == rd.markdown({**one, "sources": {**one["sources"], **two["sources"]}})
    with pytest.raises(SystemExit, match="more than one report"):
        rd.combined([one, one])
    with pytest.raises(SystemExit, match="two different models"):
        rd.combined([one, {**two, "models": {"a": "another"}}])


def test_the_summary_says_how_many_db_the_key_lacks_for_the_rate_target():
    """JPEG 2000 gains 6 dB per doubling of its rate here: at 1 / 2.5 of the key's 0.4 bpp
    (0.16 bpp) it gives 30 + 6 * log2(1.6) dB; a key of 33 dB lacks that less 33."""
    curve = [{"bpp": 0.1 * 2**i, "psnr": 30.0 + 6 * i} for i in range(5)]
    point = {"k": 4, "bpp": 0.4, "payload_bpp": 0.39, "key_bytes": 100, "psnr": 33.0, "seconds": 1}
    image = {"primis": {"m": [point]}, "codecs": dict.fromkeys(rd.SWEEPS, curve)}
    entry = rd.summarize([image, image])["m k=4 w=0"]
    expected = 30.0 + 6 * math.log2(0.4 / rd.RATE_TARGET / 0.1) - 33.0
    assert entry["psnr_short_of_rate_target"] == pytest.approx(expected)
    assert entry["rate_target_images"] == 2
    # A target rate below JPEG 2000's sweep is left out rather than guessed.
    low = {**image, "primis": {"m": [{**point, "bpp": 0.2}]}}
    assert rd.summarize([low])["m k=4 w=0"]["psnr_short_of_rate_target"] is None
