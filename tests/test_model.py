import pytest
import torch

from primis.config import ModelConfig
from primis.model import SparseTernaryAutoEncoder, refine_scores
from tests.conftest import TINY


@pytest.fixture(scope="module")
def network() -> SparseTernaryAutoEncoder:
    torch.manual_seed(0)
    return SparseTernaryAutoEncoder(TINY)


def test_code_is_exactly_sparse_ternary(network):
    code = network.encode(torch.rand(3, 1, 32, 48))
    assert code.dtype == torch.int8
    assert code.shape == (3, TINY.m, TINY.n, 32 // 8, 48 // 8)
    assert set(code.unique().tolist()) == {-1, 0, 1}
    assert (code == 1).sum(2).eq(TINY.k).all()
    assert (code == -1).sum(2).eq(TINY.k).all()


def test_ties_still_give_exact_counts(network):
    z = torch.zeros(2, TINY.m, TINY.n, 3, 3)  # every score equal
    code = network.ternarize(z, TINY.k)
    assert (code == 1).sum(2).eq(TINY.k).all() and (code == -1).sum(2).eq(TINY.k).all()


@pytest.mark.parametrize(("weight", "straight_through"), [(0.5, 0.0), (1.0, 1.0), (1.0, 0.3)])
def test_gradients_reach_every_parameter(weight, straight_through):
    torch.manual_seed(1)
    network = SparseTernaryAutoEncoder(TINY)
    x = torch.rand(2, 1, 32, 32)
    y = network(x, ternary_weight=weight, straight_through=straight_through)
    ((y - x) ** 2).mean().backward()
    for name, p in network.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_pure_ternary_steps_without_straight_through_leave_the_encoder_alone():
    network = SparseTernaryAutoEncoder(TINY)
    x = torch.rand(2, 1, 32, 32)
    ((network(x, ternary_weight=1.0) - x) ** 2).mean().backward()
    assert network.stem[1].weight.grad is None or not network.stem[1].weight.grad.any()
    assert network.beta_pos.grad.abs().sum() > 0 and network.head[0].weight.grad.abs().sum() > 0


def test_k_can_be_lowered_at_inference(network):
    x = torch.rand(1, 1, 32, 32)
    for k in range(1, TINY.k + 1):
        code = network.encode(x, k)
        assert (code == 1).sum(2).eq(k).all() and (code == -1).sum(2).eq(k).all()
        assert network.decode(code).shape == x.shape
    with pytest.raises(ValueError):
        network.encode(x, TINY.n)


def test_capacity_is_configurable():
    config = ModelConfig(stem=2, channels=[4, 8, 8], n=16, k=3, m=3, projection_kernel=3)
    network = SparseTernaryAutoEncoder(config)
    assert config.downsampling == 8
    assert network.encode(torch.rand(1, 1, 16, 24)).shape == (1, 3, 16, 2, 3)


@pytest.mark.parametrize("kernel", [1, 3])
def test_fused_code_transform_equals_the_two_layers(kernel):
    """Encoder's 1x1 map, projection and centring over atoms (and the decoder's transposed
    projection and 1x1 map) as separate layers give the same scores and features."""
    torch.manual_seed(2)
    config = ModelConfig(stem=2, channels=[4, 8], n=16, k=3, m=2, projection_kernel=kernel)
    network = SparseTernaryAutoEncoder(config).double()
    merged = torch.randn(2, 16, 3, 5, dtype=torch.float64)
    weight, bias = network._code_transform()
    if kernel > 1:
        fused = torch.nn.functional.conv2d(
            network.to_code(merged), weight, bias, padding=1, groups=2
        )
    else:
        fused = torch.nn.functional.conv2d(merged, weight, bias)
    z = network.projection(network.to_code(merged)).view(2, 2, 16, 3, 5)
    assert torch.allclose(fused.view(2, 2, 16, 3, 5), z - z.mean(dim=2, keepdim=True))
    values = torch.randn(2, 2, 16, 3, 5, dtype=torch.float64)
    layered = network.from_code(network.inverse_projection(values.view(2, 32, 3, 5)))
    assert torch.allclose(network._inverse_transform(values), layered)


@pytest.mark.parametrize("kernel", [1, 3])
def test_training_forward_decodes_like_the_shared_code(kernel):
    """The sparse training path (pure ternary, real values) matches encode/decode densely."""
    torch.manual_seed(3)
    config = ModelConfig(stem=2, channels=[4, 8], n=16, k=3, m=2, projection_kernel=kernel)
    network = SparseTernaryAutoEncoder(config).double()
    x = torch.rand(2, 1, 16, 24, dtype=torch.float64)
    code = network.encode(x)
    ternary = network.synthesis(network.magnitudes(code))
    assert torch.allclose(network(x, ternary_weight=1.0), ternary)
    real = network.synthesis(network.analysis(x) * code.abs())
    assert torch.allclose(network(x, ternary_weight=0.0), real)
    assert torch.allclose(
        network(x, ternary_weight=0.25),
        network.synthesis(
            0.25 * network.magnitudes(code) + 0.75 * network.analysis(x) * code.abs()
        ),
    )


def test_flat_positions_follow_the_logical_order_in_any_memory_layout():
    from primis.model import _flat_index

    z = torch.randn(2, 3, 8, 4, 5).permute(0, 1, 2, 4, 3).contiguous().permute(0, 1, 2, 4, 3)
    assert not z.is_contiguous()
    index = torch.randint(0, 8, (2, 3, 4, 4, 5))
    assert torch.equal(z.take(_flat_index(z.shape, index)), z.gather(2, index))


def test_invalid_capacity_is_rejected():
    with pytest.raises(ValueError):
        ModelConfig(n=8, k=5)


def test_map_masks_zero_whole_code_maps():
    from primis.train import random_map_mask

    torch.manual_seed(0)
    mask = random_map_mask(500, 3, 0.6, "cpu")
    assert mask.any(dim=1).all() and not mask.all()
    network = SparseTernaryAutoEncoder(TINY)
    x = torch.rand(2, 1, 32, 32)
    only_first = torch.tensor([[1, 0], [1, 0]])
    code = network.encode(x)
    code[:, 1] = 0
    expected = network.decode(code)
    with torch.no_grad():
        got = network(x, ternary_weight=1.0, map_mask=only_first).clamp(0, 1)
    torch.testing.assert_close(got, expected)


def test_atom_norm_standardises_over_the_batch_in_training_and_is_per_image_at_inference():
    torch.manual_seed(2)
    network = SparseTernaryAutoEncoder(TINY.model_copy(update={"atom_norm": True}))
    x = torch.rand(4, 1, 32, 32)
    z = network.analysis(x)  # training mode: batch statistics, running ones updated
    assert network.atom_norm.num_batches_tracked.item() == 1
    assert network.atom_norm.running_mean.abs().sum() > 0
    torch.testing.assert_close(z.mean(dim=2), torch.zeros_like(z.mean(dim=2)), atol=1e-5, rtol=0)
    network.eval()
    alone = network.encode(x[:1])
    assert torch.equal(alone, network.encode(x)[:1])  # the code does not depend on the batch
    assert network.atom_norm.num_batches_tracked.item() == 1


def test_fitted_magnitudes_are_each_atoms_mean_selected_score():
    torch.manual_seed(3)
    network = SparseTernaryAutoEncoder(TINY)
    x = torch.rand(3, 1, 32, 32)
    network.fit_magnitudes(network.selected_score_sums(x))
    z = network.analysis(x)
    values = z.gather(2, network.select(z, TINY.k))
    atoms = network.select(z, TINY.k)
    for code_map in range(TINY.m):
        for beta, part, sign in (
            (network.beta_pos, slice(0, TINY.k), 1),
            (network.beta_neg, slice(TINY.k, None), -1),
        ):
            chosen = atoms[:, code_map, part].flatten()
            real = values[:, code_map, part].flatten()
            for atom in chosen.unique():
                expected = sign * real[chosen == atom].mean()
                torch.testing.assert_close(beta[code_map, atom], expected, rtol=1e-5, atol=1e-6)


def test_straight_through_passes_the_decoder_input_gradient_to_every_score():
    torch.manual_seed(4)
    network = SparseTernaryAutoEncoder(TINY)
    x = torch.rand(2, 1, 32, 32)
    ((network(x, ternary_weight=1.0, straight_through=0.5) - x) ** 2).mean().backward()
    got = {name: p.grad.clone() for name, p in network.named_parameters()}
    network.zero_grad()
    z = network.analysis(x)
    decoder_input = network.magnitudes(network.ternarize(z, TINY.k))
    decoder_input.retain_grad()
    ((network.synthesis(decoder_input) - x) ** 2).mean().backward()
    z.backward(0.5 * decoder_input.grad)  # reaches the selected and the unselected scores alike
    assert decoder_input.grad.ne(0).float().mean() > 0.9
    for name, p in network.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_refined_codes_reconstruct_better_and_images_do_not_interact():
    torch.manual_seed(2)
    network = SparseTernaryAutoEncoder(TINY).eval()
    # Images this decoder can make exactly, from codes the (untrained) encoder does not find.
    x = network.decode(network.ternarize(torch.randn(2, TINY.m, TINY.n, 4, 4), TINY.k))
    valid = torch.ones_like(x)
    valid[1, :, 24:] = 0  # the second image's last rows are padding

    def error(code: torch.Tensor, i: int) -> float:
        return float(((network.decode(code) - x) ** 2 * valid)[i].sum())

    plain = network.encode(x)
    refined = network.encode(x, refine_steps=10, valid=valid)
    assert (refined == 1).sum(2).eq(TINY.k).all() and (refined == -1).sum(2).eq(TINY.k).all()
    for i in range(2):
        assert error(refined, i) < 0.95 * error(plain, i)
    alone = network.encode(x[1:], refine_steps=10, valid=valid[1:])
    assert (alone == refined[1:]).float().mean() > 0.99


def test_refine_scores_works_in_place_and_returns_the_best_scores_seen():
    # A quadratic whose minimum the steps approach, with one image that the first step makes
    # worse (its error is then scored as rising): its start must come back.
    target = torch.randn(2, 1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    start = torch.zeros_like(target)
    z = start.clone()
    storage = z.data_ptr()

    def error_and_gradient(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        error = ((scores - target) ** 2).sum(dim=(1, 2, 3, 4))
        error[1] = 1.0 if scores[1].equal(start[1]) else 2.0  # only the start is best
        return error, 2 * (scores - target)

    refined = refine_scores(z, 20, error_and_gradient, lr=0.1)
    assert refined.data_ptr() == storage  # no copy of the scores was kept
    assert ((refined[0] - target[0]) ** 2).sum() < 0.5 * (target[0] ** 2).sum()
    assert refined[1].equal(start[1])


ADAPTIVE = TINY.model_copy(update={"adaptive_rate": True, "k": 3})


def _adaptive_network(threshold: float, seed: int = 0) -> SparseTernaryAutoEncoder:
    """A tiny adaptive-rate model whose maps keep the pairs stronger than ``threshold``."""
    torch.manual_seed(seed)
    network = SparseTernaryAutoEncoder(ADAPTIVE)
    with torch.no_grad():
        network.thresholds.fill_(threshold)
    return network


def _counts(code: torch.Tensor) -> torch.Tensor:
    positive, negative = (code == 1).sum(2), (code == -1).sum(2)
    assert torch.equal(positive, negative)
    return positive


def test_adaptive_codes_keep_each_vectors_first_pairs_stronger_than_the_threshold():
    network = _adaptive_network(1.5)
    x = torch.rand(3, 1, 32, 48)
    z = network.analysis(x)
    k = ADAPTIVE.k
    top = z.topk(k, dim=2)
    bottom = z.scatter(2, top.indices, torch.inf).topk(k, dim=2, largest=False)
    strengths = (top.values - bottom.values) / 2
    assert (strengths[:, :, 1:] <= strengths[:, :, :-1]).all()  # nested gates
    kept = (strengths > 1.5).sum(2, keepdim=True)
    pair = torch.arange(k).view(1, 1, -1, 1, 1)
    expected = torch.zeros(z.shape, dtype=torch.int8)
    expected.scatter_(2, top.indices, (pair < kept).to(torch.int8))
    expected.scatter_(2, bottom.indices, -(pair < kept).to(torch.int8))
    code = network.encode(x)
    assert torch.equal(code, expected)
    counts = _counts(code)
    assert counts.max() <= k and len(counts.unique()) == k + 1  # every count 0..k occurs
    decoded = network.synthesis(network.magnitudes(code)).clamp(0, 1)
    assert torch.equal(network.decode(code), decoded)


def test_adaptive_training_forward_decodes_the_kept_pairs_and_prices_them_exactly():
    from primis.keys.enumerative import ternary_support_bits

    network = _adaptive_network(1.5, seed=1).double()
    x = torch.rand(2, 1, 32, 48, dtype=torch.float64)
    y, bits = network(x, ternary_weight=1.0, straight_through=1.0, with_bits=True)
    code = network.encode(x)
    torch.testing.assert_close(y, network.synthesis(network.magnitudes(code)))
    exact = ternary_support_bits(ADAPTIVE.n, _counts(code).flatten(1).numpy()).sum(1)
    torch.testing.assert_close(bits, torch.from_numpy(exact))
    (((y - x) ** 2).mean() + 1e-4 * bits.mean()).backward()
    assert network.thresholds.grad.abs().min() > 0 and network.stem[1].weight.grad.any()
    with pytest.raises(ValueError, match="adaptive rate"):
        SparseTernaryAutoEncoder(TINY)(x.float(), with_bits=True)


def test_adaptive_codes_start_with_every_pair_and_hold_fewer_where_refined_or_biased():
    network = _adaptive_network(0.0).eval()
    start = SparseTernaryAutoEncoder(ADAPTIVE).thresholds.detach()
    assert torch.equal(start, torch.zeros(ADAPTIVE.m))
    x = torch.rand(2, 1, 32, 32)
    assert _counts(network.encode(x)).eq(ADAPTIVE.k).all()
    with torch.no_grad():
        network.thresholds.fill_(1.5)
    refined = network.encode(x, refine_steps=3)
    assert _counts(refined).max() <= ADAPTIVE.k and _counts(refined).min() < ADAPTIVE.k
    z = network.analysis(x)
    bias = torch.full((2, *z.shape), 0.5)  # every atom costs: a pair must be stronger by 0.5
    biased = _counts(network.ternarize(z, ADAPTIVE.k, bias))
    assert (biased <= _counts(network.ternarize(z, ADAPTIVE.k))).all() and biased.sum() > 0


def test_fixed_rate_codes_of_the_bundled_model_are_the_k_largest_and_k_smallest_scores():
    """A fixed-rate model codes as before adaptive rates existed: exactly k pairs per vector,
    from the full-k selection, on a real radiograph."""
    from primis.io.images import read_image
    from primis.modelstore import load_model
    from tests.conftest import cxr_images

    network = load_model("cxr-v3").network
    assert network.thresholds is None and not any("threshold" in n for n in network.state_dict())
    x = torch.from_numpy(read_image(cxr_images()[0])[0][:256, :256].copy())[None, None]
    k = network.config.k
    z = network.analysis(x)
    top = z.topk(k, dim=2).indices
    bottom = z.scatter(2, top, torch.inf).topk(k, dim=2, largest=False).indices
    expected = torch.zeros(z.shape, dtype=torch.int8).scatter_(2, top, 1).scatter_(2, bottom, -1)
    assert torch.equal(network.encode(x), expected)
    assert torch.equal(network.ternarize(z, k), expected)
