"""NAFNet op keys (what each block and the fixed parts run, as deployed) and their builders.

``granularity='block'`` gives one key per NAF block (captures the fusion inside a block);
``'op'`` lists each op of a block: norms, 1x1 convs, depthwise conv, gates, attention and scaled
adds (for cost breakdowns). BatchNorm is folded into the next 1x1 conv at deployment, so it has no
key; a skipped block has none.
"""
from __future__ import annotations

from ernas.errors import ErnasError
from ernas.families.nafnet.model import (ChannelAttention, LayerNorm2d, NAFBlock, SimpleGate,
                                         UpSample, level_of)
from ernas.keys import op_key


def padded(shape, levels: int) -> tuple[int, int, int, int]:
    n, c, h, w = shape
    m = 2 ** levels
    return n, c, h + (-h) % m, w + (-w) % m


def position_shape(geometry: dict, position: str, input_shape) -> tuple[int, int, int, int]:
    """Input shape (N, C, H, W) of the block at a position for a network input shape."""
    levels = len(geometry["enc_blk_nums"])
    n, _, h, w = padded(input_shape, levels)
    lv = level_of(position, geometry)
    return n, geometry["width"] * 2 ** lv, h // 2 ** lv, w // 2 ** lv


def block_op_keys(shape, choice: dict, granularity: str = "block") -> list[str]:
    """Op keys one block with input ``shape`` runs, as deployed (see the module docstring)."""
    if not choice.get("keep", True):
        return []
    n, c, h, w = shape
    norm = "layernorm" if choice["norm"] == "layernorm" else "none"
    if granularity == "block":
        return [op_key("nafblock", shape, norm=norm, attention=choice["attention"],
                       kernel=choice["kernel"], dw_expand=choice["dw_expand"],
                       ffn_expand=choice["ffn_expand"])]
    if granularity != "op":
        raise ErnasError(f"granularity must be 'block' or 'op', got {granularity!r}.")
    dw, ffn = c * choice["dw_expand"], c * choice["ffn_expand"]
    ln = [op_key("layernorm2d", shape, impl="reduce")] if norm == "layernorm" else []
    sca = [op_key("sca", (n, dw // 2, h, w))] if choice["attention"] == "sca" else []
    return (ln + [op_key("conv2d", shape, k=1, cout=dw),
                  op_key("dwconv2d", (n, dw, h, w), k=choice["kernel"]),
                  op_key("simplegate", (n, dw, h, w))] + sca
            + [op_key("conv2d", (n, dw // 2, h, w), k=1, cout=c), op_key("scale_add", shape)]
            + ln + [op_key("conv2d", shape, k=1, cout=ffn), op_key("simplegate", (n, ffn, h, w)),
                    op_key("conv2d", (n, ffn // 2, h, w), k=1, cout=c),
                    op_key("scale_add", shape)])


def fixed_op_keys(geometry: dict, input_shape, granularity: str = "block") -> list[str]:
    """Ops outside the block positions: intro/ending convs, downs, ups, skip and global adds."""
    levels = len(geometry["enc_blk_nums"])
    n, ci, h, w = padded(input_shape, levels)
    width = geometry["width"]
    keys = [op_key("conv2d", (n, ci, h, w), k=3, cout=width)]
    for lv in range(levels):
        c, s = width * 2 ** lv, 2 ** lv
        keys.append(op_key("conv2d", (n, c, h // s, w // s), k=2, s=2, cout=2 * c))
    for lv in reversed(range(levels)):
        c, s = width * 2 ** (lv + 1), 2 ** (lv + 1)
        keys += [op_key("upsample", (n, c, h // s, w // s)),
                 op_key("add", (n, c // 2, h * 2 // s, w * 2 // s))]
    keys += [op_key("conv2d", (n, width, h, w), k=3, cout=ci), op_key("add", (n, ci, h, w))]
    return keys


OPS = {
    "nafblock": lambda a, s: NAFBlock(s[1], a["norm"], a["attention"], int(a["kernel"]),
                                      int(a["dw_expand"]), int(a["ffn_expand"])),
    "layernorm2d": lambda a, s: LayerNorm2d(s[1]),
    "simplegate": lambda a, s: SimpleGate(),
    "sca": lambda a, s: ChannelAttention(s[1]),
    "upsample": lambda a, s: UpSample(s[1]),
}
