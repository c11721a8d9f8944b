import torch

from acip_core.engine.basis import svd_factors, whitened_factors
from acip_core.engine.layers import ACIPLinear, LowRankLinear, ste_mask


def _layer(out=12, inp=8, bias=True, lora_rank=4, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(inp, out, bias=bias)
    f = svd_factors(lin.weight)
    return lin, ACIPLinear(lin.weight, f.U, f.s, f.Vh, lin.bias, lora_rank=lora_rank, lora_dropout=0.0)


def test_ste_forward_binary_and_gradient_zero_where_pruned():
    mask = torch.tensor([0.02, 0.001, 0.0, -0.01, -0.5], requires_grad=True)
    value = ste_mask(mask, 0.02)
    assert torch.equal(value.detach(), torch.tensor([0.02, 0.02, 0.0, 0.0, 0.0]))
    (value * torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])).sum().backward()
    # gradient 1[m > 0] times upstream: not scaled by c, exactly zero for m <= 0
    assert torch.equal(mask.grad, torch.tensor([1.0, 2.0, 0.0, 0.0, 0.0]))


def test_acip_linear_reproduces_linear_on_every_path():
    lin, acip = _layer()
    short = torch.randn(1, 3, 8)  # eval: W·x minus pruned directions
    long = torch.randn(4, 64, 8)  # eval: effective weight formed once
    for training in (True, False):  # training: the plain factored form
        acip.train(training)
        for x in (short, long):
            torch.testing.assert_close(acip(x), lin(x), atol=1e-5, rtol=1e-5)
    acip.eval()
    assert torch.equal(acip(short), lin(short))  # exact at full size
    torch.testing.assert_close(acip.dense_weight(), lin.weight, atol=1e-5, rtol=1e-5)


def test_pruned_entries_and_lora_change_the_output_as_the_formula_says():
    lin, acip = _layer(lora_rank=4)
    with torch.no_grad():
        acip.mask[[1, 5]] = -0.01
        acip.lora_B.normal_()
    assert acip.rank == 6
    keep = torch.ones(8)
    keep[[1, 5]] = 0
    expected = (acip.U * (acip.s * keep)) @ acip.Vh.double().float() + acip.lora_scaling * acip.lora_B @ acip.lora_A
    for training, x in ((True, torch.randn(2, 5, 8)), (False, torch.randn(2, 5, 8)), (False, torch.randn(4, 64, 8))):
        acip.train(training)
        acip.dropout.p = 0.0
        torch.testing.assert_close(acip(x), x @ expected.T + lin.bias, atol=1e-5, rtol=1e-5)


def test_mask_gradient_is_zero_for_pruned_entries_in_a_layer():
    _, acip = _layer()
    with torch.no_grad():
        acip.mask[0] = -0.01
    acip(torch.randn(3, 8)).pow(2).sum().backward()
    assert acip.mask.grad[0] == 0 and (acip.mask.grad[1:] != 0).all()


def test_whitened_factors_reconstruct_the_weight():
    torch.manual_seed(1)
    w, x = torch.randn(10, 6), torch.randn(100, 6) * torch.tensor([5.0, 1, 1, 0.1, 1, 1])
    f = whitened_factors(w, x.T @ x / 100)
    torch.testing.assert_close((f.U * f.s) @ f.Vh, w, atol=1e-5, rtol=1e-5)
    assert (f.s[:-1] >= f.s[1:]).all()


def test_low_rank_linear_on_views():
    down, up_t, bias = torch.randn(5, 8), torch.randn(5, 12), torch.randn(12)
    layer = LowRankLinear(down[:3], up_t[:3], bias)
    x = torch.randn(2, 8)
    torch.testing.assert_close(layer(x), x @ down[:3].T @ up_t[:3] + bias)
    assert layer.rank == 3 and layer.down.data_ptr() == down.data_ptr()
