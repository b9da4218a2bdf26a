"""The key coder benchmark times the coder on real keys that decode to their codes."""

from benchmarks.key_coder_speed import measure
from tests.conftest import cxr_images


def test_it_times_real_keys_and_names_their_bytes():
    folder = cxr_images()[0].parent
    first = measure("cxr", folder, count=2, rounds=1)
    again = measure("cxr", folder, count=2, rounds=2)
    assert first["encode_seconds"] > 0 and first["decode_seconds"] > 0
    assert first["mean_payload_bytes"] > 100
    # The same model and images give the same key bytes (strict mode: nothing random in them).
    assert first["payload_digest"] == again["payload_digest"]
