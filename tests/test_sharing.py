"""Tiled encoding and decoding (`primis.sharing.Tiling`) against whole-image processing."""

import numpy as np
import pytest
import torch

from primis.errors import PrimisError
from primis.modelstore import load_model
from primis.sharing import Tiling, decode_codes, encode_images
from tests.conftest import smooth_image

WHOLE = Tiling(cells=10**6)


def test_tiles_cover_the_grid_once_with_their_halo():
    tiling = Tiling(cells=4, halo=2)
    covered = np.zeros((10, 7), dtype=int)
    for outer, inner in tiling.tiles((10, 7)):
        covered[inner] += 1
        for o, i, size in zip(outer, inner, (10, 7), strict=True):
            assert o.start == max(0, i.start - 2) and o.stop == min(size, i.stop + 2)
    assert (covered == 1).all()
    assert tiling.fits((8 * 8, 8 * 8), 8) and not tiling.fits((8 * 9, 8), 8)
    with pytest.raises(PrimisError):
        Tiling(cells=0)


@pytest.mark.parametrize("refine_steps", [0, 3])
def test_tiled_codes_and_images_equal_whole_image_processing(tiny_model_dir, refine_steps):
    torch.manual_seed(0)
    model = load_model(tiny_model_dir)
    image = smooth_image(8 * 13 - 3, 8 * 17 - 5, seed=3).astype(np.float32)
    k = model.network.config.k
    tiled = Tiling(cells=4, halo=12)  # 4x5 tiles of at most 28x28 positions
    whole_code = encode_images(model, [image], k, refine_steps, tiling=WHOLE)[0]
    tiled_code = encode_images(model, [image], k, refine_steps, tiling=tiled)[0]
    whole_image = decode_codes(model, [whole_code], tiling=WHOLE)[0]
    if refine_steps == 0:
        # The encoder is a function of its receptive field: with enough halo, codes are equal.
        assert torch.equal(tiled_code, whole_code)
        # Without context the tiles' borders see zero padding instead of the image.
        blind = encode_images(model, [image], k, 0, tiling=Tiling(cells=4, halo=0))[0]
        assert not torch.equal(blind, whole_code)
    else:
        # Refinement optimises each tile on its own pixels: codes differ, quality does not.
        error = [
            float(np.mean((decode_codes(model, [c], tiling=WHOLE)[0] - image_padded(image)) ** 2))
            for c in (whole_code, tiled_code)
        ]
        assert error[1] < 1.1 * error[0]
    np.testing.assert_allclose(
        decode_codes(model, [whole_code], tiling=tiled)[0], whole_image, atol=1e-5
    )


def image_padded(image: np.ndarray) -> np.ndarray:
    from primis.imageio import pad_to_multiple

    return pad_to_multiple(image, 8)
