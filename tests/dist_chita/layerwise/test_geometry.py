import pytest
import torch
from torch import nn

from dist_chita.layerwise.geometry import check_zero_padding, from_rows, groups, input_rows, input_size, weight_rows


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's note on its own padding
def test_rows_and_inputs_reproduce_each_layer_type():
    """weight_rows(W) applied to input_rows(x) gives the layer's own output (so H = X^T X is the curvature of the
    rows the solver prunes): Linear on padded sequences, Conv2d with stride/padding/dilation and with groups (each
    group's rows on its own inputs), transformers' Conv1D."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    lin = nn.Linear(6, 5, bias=False)
    x = torch.randn(3, 4, 6)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    rows = input_rows(lin, x, mask)
    assert rows.shape == (9, 6)
    torch.testing.assert_close(rows.double() @ weight_rows(lin, lin.weight).double().T, lin(x)[mask.bool()].double())

    conv = nn.Conv2d(3, 4, (3, 2), stride=2, padding=1, dilation=(1, 2), bias=False)
    img = torch.randn(2, 3, 9, 8)
    out = conv(img)  # (2, 4, H', W')
    rows = input_rows(conv, img, None)
    expected = out.permute(0, 2, 3, 1).reshape(-1, 4).double()
    torch.testing.assert_close(rows.double() @ weight_rows(conv, conv.weight).double().T, expected)

    c1d = Conv1D(5, 6)  # weight stored (in, out)
    torch.nn.init.normal_(c1d.bias, std=0.0)
    y = c1d(x)
    rows = input_rows(c1d, x, None)
    torch.testing.assert_close(rows.double() @ weight_rows(c1d, c1d.weight).double().T, y.reshape(-1, 5).double())

    grouped = nn.Conv2d(6, 9, 3, padding=1, groups=3, bias=False)  # 3 groups: 3 outputs, 2 x 3 x 3 inputs each
    img = torch.randn(2, 6, 5, 4)
    rows = input_rows(grouped, img, None)  # all channels; group j's inputs are columns [18 j, 18 (j + 1))
    per_group = rows.view(-1, 3, 18)
    W_rows = weight_rows(grouped, grouped.weight).double().view(3, 3, 18)  # (group, output in group, input)
    got = torch.einsum("ngd,god->ngo", per_group.double(), W_rows).reshape(-1, 9)
    torch.testing.assert_close(got, grouped(img).permute(0, 2, 3, 1).reshape(-1, 9).double())

    for same in (nn.Conv2d(3, 2, (4, 3), padding="same", dilation=(1, 2), bias=False),  # even kernel: uneven pad
                 nn.Conv2d(3, 2, 3, padding="valid", bias=False)):
        rows = input_rows(same, img[:, :3], None)
        expected = same(img[:, :3]).permute(0, 2, 3, 1).reshape(-1, 2).double()
        torch.testing.assert_close(rows.double() @ weight_rows(same, same.weight).double().T, expected,
                                   rtol=1e-5, atol=1e-6)

    with pytest.raises(ValueError, match="zero padding only"):
        input_rows(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), torch.randn(1, 4, 5, 5), None)


def test_torch_conv1d_rows_reproduce_its_output():
    """nn.Conv1d (a default prunable type) as a Conv2d of height 1: stride, padding, dilation, "same" with an even
    kernel, and groups (each group's rows on its own inputs). Before, its (b, C, L) input was taken as rows of L
    features: a shape error, or wrong rows without a word when L happened to equal C k."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 12)
    for conv in (nn.Conv1d(4, 5, 3, stride=2, padding=1, dilation=2, bias=False),
                 nn.Conv1d(4, 3, 4, padding="same", dilation=2, bias=False),
                 nn.Conv1d(4, 3, 3, padding="valid", bias=False)):
        rows = input_rows(conv, x, None)
        expected = conv(x).permute(0, 2, 1).reshape(-1, conv.out_channels).double()
        torch.testing.assert_close(rows.double() @ weight_rows(conv, conv.weight).double().T, expected,
                                   rtol=1e-5, atol=1e-6)
        assert input_size(conv, tuple(conv.weight.shape)) == rows.shape[1] == 4 * conv.kernel_size[0]
    grouped = nn.Conv1d(4, 6, 3, padding=1, groups=2, bias=False)  # 2 groups: 3 outputs, 2 x 3 inputs each
    assert groups(grouped) == 2
    per_group = input_rows(grouped, x, None).view(-1, 2, 6).double()
    got = torch.einsum("ngd,god->ngo", per_group, weight_rows(grouped, grouped.weight).double().view(2, 3, 6))
    torch.testing.assert_close(got.reshape(-1, 6), grouped(x).permute(0, 2, 1).reshape(-1, 6).double())
    with pytest.raises(ValueError, match="zero padding only"):
        input_rows(nn.Conv1d(4, 4, 3, padding=1, padding_mode="circular"), x, None)


def test_from_rows_inverts_weight_rows_and_sizes_follow_the_rows():
    """from_rows(weight_rows(W)) is W for every layer type; input_size is the rows' length without reading the
    weight; groups is a grouped Conv2d's g, else 1; the padding check names the layer."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(1)
    for layer in (nn.Linear(6, 5), Conv1D(5, 6), nn.Conv2d(6, 9, (3, 2), groups=3), nn.Conv2d(2, 4, 3)):
        W = layer.weight.detach()
        rows = weight_rows(layer, W)
        assert rows.shape[1] == input_size(layer, tuple(W.shape))
        assert rows.shape[0] * rows.shape[1] == W.numel()
        assert torch.equal(from_rows(layer, rows.clone(), W.shape), W)
    stored = torch.arange(30.0).view(6, 5)  # Conv1D's (inputs, outputs): output i is column i
    assert torch.equal(weight_rows(Conv1D(5, 6), stored)[1], stored[:, 1])
    assert [groups(m) for m in (nn.Linear(2, 2), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1, groups=2))] == [1, 1, 2]
    check_zero_padding(nn.Conv2d(4, 4, 3, padding=1))
    with pytest.raises(ValueError, match=r"^enc\.3: objective layerwise supports Conv1d and Conv2d with zero padding"):
        check_zero_padding(nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"), "enc.3")
