"""Runtime replacements for compressed modules (all keep the replaced module's interface).

Each replacement lists in `stored_names` the parameters that belong to its compressed
group (they are saved once, under the group's prefix); everything else it holds, such as
the original bias, is an ordinary parameter of the model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from aecompress.errors import AecompressError


class LowRankLinear(nn.Module):
    """y = x (A B)^T + bias, as two small matmuls. Stores A [out, r] and B [r, in]."""

    stored_names: ClassVar[tuple[str, ...]] = ("a", "b")

    def __init__(self, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.a, self.b, self.bias = a, b, bias
        self.in_features, self.out_features = b.shape[1], a.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.b), self.a, self.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight [out, in] this module computes with (built on demand)."""
        return self.a @ self.b

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.a.shape[1]}"


class LowRankEmbedding(nn.Module):
    """Row lookup in A [vocab, r] followed by B [r, dim]: the embedding table is A B."""

    stored_names: ClassVar[tuple[str, ...]] = ("a", "b")

    def __init__(self, a: torch.Tensor, b: torch.Tensor, padding_idx: int | None) -> None:
        super().__init__()
        self.a, self.b, self.padding_idx = a, b, padding_idx
        self.num_embeddings, self.embedding_dim = a.shape[0], b.shape[1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.a, self.padding_idx) @ self.b

    @property
    def weight(self) -> torch.Tensor:
        return self.a @ self.b

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.a.shape[1]}"


class FusedLinear(nn.Module):
    """A fused projection (GPT-2's c_attn: q, k, v) as parts whose outputs are concatenated."""

    def __init__(self, parts: Sequence[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    @classmethod
    def split(cls, weight: torch.Tensor, bias: torch.Tensor | None, count: int) -> FusedLinear:
        """Split a dense [out, in] weight (and bias) into `count` equal nn.Linear parts."""
        out_features, in_features = weight.shape
        rows = out_features // count
        parts = []
        for index in range(count):
            part = nn.Linear(in_features, rows, bias=bias is not None)
            span = slice(index * rows, (index + 1) * rows)
            part.weight = nn.Parameter(weight[span].detach().clone())
            if bias is not None:
                part.bias = nn.Parameter(bias[span].detach().clone())
            parts.append(part)
        return cls(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)

    def merged(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fused [out, in] weight and bias that the parts compute together."""
        parts = [cast(nn.Linear, part) for part in self.parts]
        weight = torch.cat([part.weight for part in parts])
        biases = tuple(part.bias for part in parts)
        return weight, None if biases[0] is None else torch.cat(biases)


def dense_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding `weight` [out, in] (a decoded matrix) and the original bias."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight = nn.Parameter(weight.detach().clone())
    if bias is not None:
        linear.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias)
    return linear


def plain_linear(weight: torch.Tensor, bias: torch.Tensor | None, kind: str) -> nn.Module:
    """The base model's own module for a dense [out, in] weight: nn.Linear, or GPT-2's
    Conv1D ([in, out] layout) when `kind` is "conv1d"."""
    if kind != "conv1d":
        return dense_linear(weight, bias)
    conv = Conv1D(weight.shape[0], weight.shape[1])
    conv.weight = nn.Parameter(weight.detach().T.contiguous())
    if bias is not None:
        conv.bias = nn.Parameter(bias.detach().clone())
    return conv


def dense_embedding(weight: torch.Tensor, padding_idx: int | None) -> nn.Embedding:
    return nn.Embedding.from_pretrained(
        weight.detach().clone(), freeze=False, padding_idx=padding_idx
    )


# Activations a decoder may use, by the name recorded in an artifact's metadata.
DECODER_ACTIVATIONS = ("leaky_relu", "relu", "gelu", "silu", "tanh")
DECODER_OUTPUTS = ("tanh", "none")


@dataclass(frozen=True)
class DecoderSpec:
    """How a decoder's layers are joined: the activation between layers (LeakyReLU takes
    `negative_slope`), the activation after the last layer, and norm enforcement.

    A decoder with one layer is linear: it applies no activation at all.
    """

    activation: str = "leaky_relu"
    negative_slope: float = 0.01
    output: str = "tanh"
    norm: bool = True

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "leaky_relu":
            return F.leaky_relu(x, self.negative_slope)
        if self.activation == "relu":
            return F.relu(x)
        if self.activation == "gelu":
            return F.gelu(x)
        if self.activation == "silu":
            return F.silu(x)
        if self.activation == "tanh":
            return torch.tanh(x)
        raise ValueError(f"unknown activation '{self.activation}'")

    def final(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) if self.output == "tanh" else x


def decoder_layers(
    decoder: Mapping[str, torch.Tensor],
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """The (weight [out, in], bias or None) pairs of a decoder stored as w0, b0, w1, b1, ..."""
    count = sum(1 for name in decoder if name.startswith("w") and name[1:].isdigit())
    return [(decoder[f"w{i}"], decoder.get(f"b{i}")) for i in range(count)]


def decode_rows(
    codes: torch.Tensor,
    decoder: Mapping[str, torch.Tensor],
    spec: DecoderSpec,
    norms: torch.Tensor | None,
) -> torch.Tensor:
    """Rows [n, m] decoded from codes [n, x] by the decoder's layers w0, b0, w1, b1, ...

    A decoder with a `skip` weight [m, x] adds the linear path codes @ skip^T to the
    layers' output. With `norms` (norm enforcement) each decoded row is rescaled to its
    stored L2 norm.
    """
    layers = decoder_layers(decoder)
    out = codes
    for index, (weight, bias) in enumerate(layers):
        out = F.linear(out, weight, bias)
        if len(layers) > 1:
            out = spec.hidden(out) if index < len(layers) - 1 else spec.final(out)
    if "skip" in decoder:
        out = out + F.linear(codes, decoder["skip"])
    if norms is not None:
        out = out * (norms / out.norm(dim=1).clamp_min(1e-12)).unsqueeze(1)
    return out


class _Decoded(nn.Module):
    """Shared decoder tensors + this member's codes (and row norms), as parameters.

    The decoder tensors are the group's shared parameters (one set for all members), so
    fine-tuning updates the one decoder that is saved.
    """

    def __init__(
        self,
        codes: torch.Tensor,
        decoder: Mapping[str, torch.Tensor],
        spec: DecoderSpec,
        norms: torch.Tensor | None,
    ) -> None:
        super().__init__()
        self.codes, self.norms, self.spec = codes, norms, spec
        self.decoder_names = tuple(decoder)
        for name, tensor in decoder.items():
            setattr(self, name, tensor)
        optional = ["norms"] if norms is not None else []
        self.stored_names: tuple[str, ...] = ("codes", *decoder, *optional)

    def decoder(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.decoder_names}

    def decode(self, codes: torch.Tensor, norms: torch.Tensor | None) -> torch.Tensor:
        return decode_rows(codes, self.decoder(), self.spec, norms)

    @property
    def weight(self) -> torch.Tensor:
        """The dense matrix [rows, cols] this module computes with (decoded on demand)."""
        return self.decode(self.codes, self.norms)

    def widths(self) -> list[int]:
        return [self.codes.shape[1]] + [w.shape[0] for w, _ in decoder_layers(self.decoder())]


class DecodedLinear(_Decoded):
    """y = x W^T + bias with W decoded from the codes on every forward pass."""

    def __init__(
        self,
        codes: torch.Tensor,
        decoder: Mapping[str, torch.Tensor],
        spec: DecoderSpec,
        norms: torch.Tensor | None,
        bias: torch.Tensor | None,
    ) -> None:
        super().__init__(codes, decoder, spec, norms)
        self.bias = bias
        self.out_features, self.in_features = codes.shape[0], self.widths()[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, decoder={self.widths()}"


class DecodedEmbedding(_Decoded):
    """Embedding lookup that decodes only the rows asked for (codes -> decoder -> norms)."""

    def __init__(
        self,
        codes: torch.Tensor,
        decoder: Mapping[str, torch.Tensor],
        spec: DecoderSpec,
        norms: torch.Tensor | None,
        padding_idx: int | None,
    ) -> None:
        super().__init__(codes, decoder, spec, norms)
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim = codes.shape[0], self.widths()[-1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        norms = None if self.norms is None else self.norms[flat]
        rows = self.decode(self.codes[flat], norms)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, decoder={self.widths()}"


# --- integer-quantized weights, held packed ------------------------------------------------

INT4_GROUPS = (256, 128, 64, 32)  # the group sizes torch's CPU int4 kernel takes
DEQUANTIZED_WEIGHTS = 1 << 18  # weights dequantized at once (~13 bytes each transient)
Kernel = Literal["int4", "int8", "dequantize"]
BF16 = torch.bfloat16


def unpack(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """The uint8 codes [rows, cols] that compressed-tensors' dense `pack-quantized` int32
    words [rows, ceil(cols * bits / 32)] hold (methods.quantize.pack: code j at bits
    j*bits.. of its row's little-endian bit stream), on their device. Eight codes fill
    `bits` bytes: each such unit is widened to one int64 and shifted apart."""
    rows, units = packed.shape[0], -(-cols // 8)
    if not packed.is_contiguous() or packed.stride(-1) != 1:  # (a column of one word may
        packed = packed.clone(memory_format=torch.contiguous_format)  # count as contiguous)
    raw = packed.view(torch.uint8)[:, : units * bits]
    wide = torch.zeros(rows, units, 8, dtype=torch.uint8, device=packed.device)
    wide[..., :bits] = F.pad(raw, (0, units * bits - raw.shape[1])).view(rows, units, bits)
    shifts = torch.arange(0, 8 * bits, bits, device=packed.device)
    codes = (wide.view(torch.int64) >> shifts) & (2**bits - 1)
    return codes.view(rows, units * 8)[:, :cols].to(torch.uint8)


def zero_points(
    zeros: torch.Tensor | None, bits: int, rows: int, groups: int, device: torch.device
) -> torch.Tensor:
    """Zero points [rows, groups] (float32) from their packed form [ceil(rows * bits / 32),
    groups] (compressed-tensors packs them along the rows); 2^(bits-1) for None."""
    if zeros is None:
        return torch.full((rows, groups), 2.0 ** (bits - 1), device=device)
    return unpack(zeros.T, bits, rows).T.float()


def dequantize_packed(
    packed: torch.Tensor,
    scales: torch.Tensor,
    points: torch.Tensor,
    bits: int,
    cols: int,
    group: int | None = None,
) -> torch.Tensor:
    """The weight rows [rows, cols], (code - zero) * scale, from packed codes [rows, words],
    scales and zero points [rows, groups] of `group` consecutive columns (None: cols /
    groups; the last group may be shorter), in the scales' dtype (differentiable in them)."""
    rows, groups = scales.shape
    size = group or cols // groups
    codes = unpack(packed, bits, groups * size).to(scales.dtype).view(rows, groups, size)
    shifted = codes - points.to(scales.dtype)[..., None]
    return (shifted * scales[..., None]).view(rows, groups * size)[:, :cols]


def choose_kernel(bits: int, rows: int, cols: int, group: int, device: torch.device) -> Kernel:
    """How a QuantizedLinear (see there) may multiply by a [rows, cols] weight of `bits`
    codes in groups of `group` columns held on `device`."""
    if device.type != "cpu":
        return "dequantize"
    if bits == 4 and rows % 16 == 0 and any(group % size == 0 for size in INT4_GROUPS):
        return "int4"  # (its packing refuses other row counts)
    if bits == 8 and group == cols and cols % 16 == 0:
        return "int8"  # (it reads 8 or 16 columns at a time: other widths crash or misread)
    return "dequantize"


class QuantizedLinear(nn.Module):
    """y = x W^T + bias for an integer-quantized W [out, in] held packed: W = (code - zero)
    * scale, the `in / groups` consecutive columns of a group of a row sharing a scale and a
    zero point (2^(bits-1) when `zeros` is None: a symmetric scheme).

    Built from the stored form: `packed` codes (compressed-tensors' int32 words, see
    `unpack`), `scales` [out, groups] and the packed `zeros` ([ceil(out * bits / 32),
    groups]) or None. How it multiplies (`kernel`), chosen once:
    - "int4" (4 bits on the CPU, out a multiple of 16, groups of a multiple of 32 columns):
      torch's CPU int4 kernel, in groups of the largest of 256, 128, 64, 32 dividing the
      group (its scale repeated). Holds the codes in the kernel's layout and, in bf16, each
      group's scale and zero term (8 - zero) * scale (rounded: by at most 8 * scale * 2^-9).
      Input and output are rounded to bf16.
    - "int8" (8 bits on the CPU, one group per row, in a multiple of 16): torch's int8 kernel
      on code - 128 and bf16 scales, in bf16; asymmetric, sum(x) * (128 - zero) * scale is
      added.
    - "dequantize" (anything else, any device, or `kernels=False`): holds the stored
      tensors themselves; each call dequantizes whole rows, about DEQUANTIZED_WEIGHTS
      weights at a time, in float32 (exact; on a CPU without bf16 matrix units also faster
      than the int4 kernel for long inputs: 512 tokens through 1536 x 576 on a loaded
      2-core AMD EPYC, 3 bits, took 31-36 ms against the int4 kernel's 49-67).
    The kernels' layouts live on the CPU only: such a module refuses to move elsewhere
    (build it from the stored tensors there). Its buffers are all it holds (bias aside);
    none is in its state_dict (an artifact saves the stored tensors).
    """

    stored_names: ClassVar[tuple[str, ...]] = ()  # it holds no Parameter of its group
    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    scales_and_zeros: torch.Tensor
    zero_term: torch.Tensor | None

    def __init__(
        self,
        packed: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        bits: int,
        in_features: int,
        bias: torch.Tensor | None = None,
        *,
        kernels: bool = True,
    ) -> None:
        super().__init__()
        _check_packed(packed, scales, zeros, bits, in_features)
        self.bits, self.in_features, self.out_features = bits, in_features, packed.shape[0]
        self.groups, self.bias = scales.shape[1], bias
        self.group = in_features // self.groups
        kernel = choose_kernel(bits, packed.shape[0], in_features, self.group, packed.device)
        self.kernel: Kernel = kernel if kernels else "dequantize"
        with torch.no_grad():
            if self.kernel == "int4":
                points = zero_points(zeros, 4, self.out_features, self.groups, packed.device)
                self._hold_int4(unpack(packed, 4, in_features), scales.float(), points)
            elif self.kernel == "int8":
                self._hold_int8(unpack(packed, 8, in_features), scales[:, 0].float(), zeros)
            else:
                self._hold("packed", packed)
                self._hold("scales", scales)
                self._hold("zeros", zeros)

    def _hold(self, name: str, tensor: torch.Tensor | None) -> None:
        """A buffer left out of the state_dict (sharing the given tensor's memory)."""
        self.register_buffer(name, None if tensor is None else tensor.detach(), persistent=False)

    def _hold_int4(self, codes: torch.Tensor, scales: torch.Tensor, points: torch.Tensor) -> None:
        """`packed`: the codes in the int4 kernel's layout; `scales_and_zeros` [in /
        kernel_group, out, 2]: the scale and (8 - zero) * scale of each kernel group,
        bf16 numbers kept as their int16 bits (so that model.to(dtype) leaves them be)."""
        self.kernel_group = next(g for g in INT4_GROUPS if self.group % g == 0)
        self._hold("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), 1))
        terms = torch.stack([scales, (8 - points) * scales], dim=2)
        terms = terms.repeat_interleave(self.group // self.kernel_group, dim=1).transpose(0, 1)
        self._hold("scales_and_zeros", terms.to(BF16).view(torch.int16).contiguous())

    def _hold_int8(
        self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None
    ) -> None:
        """`packed`: codes - 128 [out, in] (int8); `scales` [out]: bf16 as int16 bits;
        `zero_term` [out]: (128 - zero) * scale in float32, or None (symmetric)."""
        self._hold("packed", (codes.int() - 128).to(torch.int8))
        self._hold("scales", scales.to(BF16).view(torch.int16))
        points = zero_points(zeros, 8, self.out_features, 1, codes.device)[:, 0]
        self._hold("zero_term", None if zeros is None else (128 - points) * scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.kernel == "int4":
            out = self._int4(flat)
        elif self.kernel == "int8":
            out = self._int8(flat)
        else:
            out = self._dequantized(flat)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def _int4(self, x: torch.Tensor) -> torch.Tensor:
        if not len(x):  # the kernel refuses an empty input
            return x.new_zeros(0, self.out_features)
        terms = self.scales_and_zeros.view(BF16)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            _bf16(x), self.packed, self.kernel_group, terms
        )
        return out.to(x.dtype)

    def _int8(self, x: torch.Tensor) -> torch.Tensor:
        scales = self.scales.view(BF16)
        out = torch.ops.aten._weight_int8pack_mm(_bf16(x), self.packed, scales).to(x.dtype)
        if self.zero_term is None:
            return out
        return out + x.sum(dim=1, keepdim=True) * self.zero_term.to(x.dtype)

    def _dequantized(self, x: torch.Tensor) -> torch.Tensor:
        points = zero_points(self.zeros, self.bits, self.out_features, self.groups, x.device)
        step = max(1, DEQUANTIZED_WEIGHTS // self.in_features)
        parts = [
            F.linear(x, self._rows(start, start + step, points).to(x.dtype))
            for start in range(0, self.out_features, step)
        ]
        return torch.cat(parts, dim=1)

    def _rows(self, start: int, end: int, points: torch.Tensor) -> torch.Tensor:
        """Rows start..end of W (float32), dequantized from the stored tensors."""
        scales = self.scales[start:end].float()
        return dequantize_packed(
            self.packed[start:end], scales, points[start:end], self.bits, self.in_features
        )

    @property
    def weight(self) -> torch.Tensor:
        """The dense float32 weight [out, in] this module computes with, built on demand.
        The int4 kernel's codes are read back through the kernel (the identity as input,
        unit scales): in^2 * out multiply-adds."""
        if self.kernel == "int8":
            weight = self.packed.float() * self.scales.view(BF16).float()[:, None]
            return weight if self.zero_term is None else weight + self.zero_term[:, None]
        if self.kernel == "int4":
            return self._int4_weight()
        points = zero_points(
            self.zeros, self.bits, self.out_features, self.groups, self.packed.device
        )
        return self._rows(0, self.out_features, points)

    def _int4_weight(self) -> torch.Tensor:
        """(code - 8) * scale + zero term, the codes read back as the kernel's output for
        scale 1 and zero term 8 (small integers: exact in bf16), a block of rows of the
        identity at a time."""
        terms = self.scales_and_zeros.view(BF16).float()
        unit = torch.tensor([1.0, 8.0], dtype=BF16).expand_as(terms).contiguous()
        cols, step = self.in_features, max(1, DEQUANTIZED_WEIGHTS // self.in_features)
        blocks = []
        for start in range(0, cols, step):
            eye = torch.zeros(min(step, cols - start), cols, dtype=BF16)
            eye.diagonal(start).fill_(1)
            blocks.append(
                torch.ops.aten._weight_int4pack_mm_for_cpu(
                    eye, self.packed, self.kernel_group, unit
                )
            )
        shifted = torch.cat(blocks).T.float().reshape(self.out_features, -1, self.kernel_group)
        scales, zeros = terms.transpose(0, 1).unbind(dim=2)
        weight = (shifted - 8) * scales[..., None] + zeros[..., None]
        return weight.view(self.out_features, cols)

    def _apply(self, fn: Callable[..., torch.Tensor], recurse: bool = True) -> QuantizedLinear:
        if self.kernel != "dequantize" and fn(torch.empty(0)).device.type != "cpu":
            raise AecompressError(
                f"a QuantizedLinear on the CPU {self.kernel} kernel cannot leave the CPU: "
                "build it from the stored tensors on the device instead"
            )
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bits={self.bits}, "
            f"group={self.group}, kernel={self.kernel}"
        )


def _bf16(x: torch.Tensor) -> torch.Tensor:
    """x [t, in] in bf16, contiguous and 64-byte aligned (the int8 kernel's aligned loads
    crash on a view that starts mid-line)."""
    x = x.to(BF16).contiguous()
    return x if x.data_ptr() % 64 == 0 else x.clone()


def _check_packed(
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    in_features: int,
) -> None:
    """The stored tensors' shapes agree: packed [out, ceil(in * bits / 32)], scales [out,
    groups] with groups dividing in, zeros [ceil(out * bits / 32), groups] or None."""
    rows, groups = packed.shape[0], scales.shape[1]
    words = (-(-in_features * bits // 32), -(-rows * bits // 32))
    zeros_shape = None if zeros is None else tuple(zeros.shape)
    if (
        packed.dtype != torch.int32
        or tuple(packed.shape) != (rows, words[0])
        or tuple(scales.shape) != (rows, groups)
        or in_features % groups
        or zeros_shape not in (None, (words[1], groups))
    ):
        raise AecompressError(
            f"packed {tuple(packed.shape)}, scales {tuple(scales.shape)} and zeros "
            f"{zeros_shape} are no {bits}-bit weight of {in_features} columns"
        )
