"""HRNet-lite super-blocks: the weight-shared mixture of a position's candidates.

``BlockSuper`` (a branch block): one block of each candidate type, built at the largest kernel K
and the largest hidden width; during a forward pass

- kernel k: every k×k weight is W ⊙ Σ_k p_k·M_k (centre masks, ``mix_kernel``);
- width w: the hidden channels before the block's last conv are masked by Σ_w p_w·1[j < h(w)]
  (``mask_channels``; h(w) = ``hidden_channels``, per block type);
- block type: Σ_t p_t·block_t(x) (each type its own weights);
- keep: p_keep·out + p_skip·x.

``FuseSuper`` (a fuse unit): z_i = y_i + p_keep·Σ_j path_ij(y_j). ``FourthBranchSuper``: the
fourth branch's parts, its blocks being ``BlockSuper`` under the position's own block, kernel and
width probabilities; ``presence()`` = p_keep scales every term it adds to branches 0-2 and the
head.

``extract_state(choice)`` gives the state dict of ``make_block(geometry, position, choice)``: the
chosen type's weights with every k×k kernel centre-cropped and every hidden dimension cut to its
first h(w) channels (``cut_state``), so the extracted network computes what the supernet computes
with one-hot probabilities.
"""
from __future__ import annotations

import torch
from torch import nn

from ernas.families.hrnet_lite.blocks import (BLOCKS, Mix, branch_block, exchange,
                                              fuse_paths, hidden_channels)
from ernas.families.hrnet_lite.model import branch_channels, build_fourth_branch, fuse_pairs
from ernas.nn.mixed import (SuperBlock, centre_crop_kernel, channel_masks, index_of,
                            keep_or_skip, kernel_masks)


def cut_state(source: dict, target: dict) -> dict:
    """``source`` tensors cut to ``target``'s shapes: k×k kernels (dims 2, 3 of 4-D weights)
    centre-cropped, every other dimension cut to its first entries."""
    out = {}
    for name, t in target.items():
        s = source[name]
        if s.dim() == 4:
            s = centre_crop_kernel(s, t.shape[-1])
        out[name] = s[tuple(slice(0, n) for n in t.shape)]
    return out


def keep_weight(block: SuperBlock):
    """p_keep of a super-block (None when keep is fixed)."""
    p = block.mixed("keep")
    return None if p is None else p[index_of(block.cands["keep"], True)]


class BlockSuper(SuperBlock):
    """Weight-shared branch block (see the module docstring)."""

    def __init__(self, channels: int, cands: dict):
        super().__init__(cands)
        self.channels = channels
        K, widths = max(cands["kernel"]), cands["width"]
        self.types = nn.ModuleDict({t: BLOCKS[t](channels, K, hidden_channels(t, channels,
                                                                               max(widths)))
                                    for t in cands["block"]})
        self.register_buffer("kernel_masks", kernel_masks(cands["kernel"], K), persistent=False)
        for t in cands["block"]:
            hidden = [hidden_channels(t, channels, w) for w in widths]
            self.register_buffer(f"width_masks_{t}", channel_masks(hidden, max(hidden)),
                                 persistent=False)

    def forward(self, x):
        pk, pw, pb = self.mixed("kernel"), self.mixed("width"), self.mixed("block")
        outs = [block(x, Mix(pk, self.kernel_masks, pw, getattr(self, f"width_masks_{t}")))
                for t, block in self.types.items()]
        out = outs[0] if pb is None else sum(pb[i] * o for i, o in enumerate(outs))
        return keep_or_skip(out, x, self.mixed("keep"), self.cands["keep"])

    def extract_state(self, choice: dict) -> dict:
        with torch.device("meta"):
            target = branch_block(self.channels, choice).state_dict()
        return cut_state(self.types[choice["block"]].state_dict(), target)


class FuseSuper(SuperBlock):
    """Fuse unit whose keep is searched (see the module docstring)."""

    def __init__(self, channels: list[int], n: int, cands: dict):
        super().__init__(cands)
        self.paths = fuse_paths(channels, fuse_pairs(n))

    def forward(self, ys):
        return exchange(self.paths, ys, ys, keep_weight(self))

    def extract_state(self, choice: dict) -> dict:
        return self.state_dict()


class FourthBranchSuper(SuperBlock):
    """The fourth branch with searched keep, block, kernel and width (see the module
    docstring). Its blocks share the position's probabilities (``p`` is passed down)."""

    def __init__(self, geometry: dict, cands: dict):
        super().__init__(cands)
        inner = {**cands, "keep": (True,)}
        c3 = branch_channels(geometry)[3]
        build_fourth_branch(self, geometry, lambda: BlockSuper(c3, inner))

    @property
    def p(self):
        return self._p

    @p.setter
    def p(self, value):
        self._p = value
        for m in self.modules():
            if isinstance(m, BlockSuper):
                m.p = value

    def presence(self):
        return keep_weight(self)

    def extract_state(self, choice: dict) -> dict:
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("blocks.")}
        for m, seq in enumerate(self.blocks):
            for j, block in enumerate(seq):
                state.update({f"blocks.{m}.{j}.{k}": v
                              for k, v in block.extract_state(choice).items()})
        return state

