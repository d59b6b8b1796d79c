"""diffssl's block numbers (1-based over ADM's ``input_blocks``, ``middle_block``, ``output_blocks``: 1–18
encoder, 19 middle, 20–37 decoder for the 256 model) → our :class:`~diffssl_plugin.backbones.DDAEBackbone` names
(:func:`diffssl_block_name`). ``*``: an encoder *unit* (``extract`` can edit it, e.g. DifFeed's feedback, and
it is the mirror of a decoder block, diffssl's ``b ↔ 38 - b``) but not a readable block; every decoder block and
the middle are readable. Channels and resolutions for the 256×256 model (as diffssl's ``ssl_diff/const.py``
lists them; papers.md §3.1's table has blocks 25 and 31 wrong: they keep the channels of the level they close):

====  ===========  ===========  ===================  ====  ========  ===========  =========================
 b    ours         ch @ res     ADM module            b     ours      ch @ res     ADM module
====  ===========  ===========  ===================  ====  ========  ===========  =========================
 1    conv_in*     256 @ 256    input_blocks.0        20    up0.0     1024 @ 8     output_blocks.0
 2    down0.0*     256 @ 256    input_blocks.1        21    up0.1     1024 @ 8     output_blocks.1
 3    down0.1*     256 @ 256    input_blocks.2        22    up0       1024 @ 16    output_blocks.2 (+up)
 4    down0        256 @ 128    input_blocks.3 (↓)    23    up1.0     1024 @ 16    output_blocks.3
 5    down1.0*     256 @ 128    input_blocks.4        24    up1.1     1024 @ 16    output_blocks.4
 6    down1.1*     256 @ 128    input_blocks.5        25    up1       1024 @ 32    output_blocks.5 (+up)
 7    down1        256 @ 64     input_blocks.6 (↓)    26    up2.0     512 @ 32     output_blocks.6
 8    down2.0*     512 @ 64     input_blocks.7        27    up2.1     512 @ 32     output_blocks.7
 9    down2.1*     512 @ 64     input_blocks.8        28    up2       512 @ 64     output_blocks.8 (+up)
 10   down2        512 @ 32     input_blocks.9 (↓)    29    up3.0     512 @ 64     output_blocks.9
 11   down3.0*     512 @ 32     input_blocks.10       30    up3.1     512 @ 64     output_blocks.10
 12   down3.1*     512 @ 32     input_blocks.11       31    up3       512 @ 128    output_blocks.11 (+up)
 13   down3        512 @ 16     input_blocks.12 (↓)   32    up4.0     256 @ 128    output_blocks.12
 14   down4.0*     1024 @ 16    input_blocks.13       33    up4.1     256 @ 128    output_blocks.13
 15   down4.1*     1024 @ 16    input_blocks.14       34    up4       256 @ 256    output_blocks.14 (+up)
 16   down4        1024 @ 8     input_blocks.15 (↓)   35    up5.0     256 @ 256    output_blocks.15
 17   down5.0*     1024 @ 8     input_blocks.16       36    up5.1     256 @ 256    output_blocks.16
 18   down5        1024 @ 8     input_blocks.17       37    up5       256 @ 256    output_blocks.17
 19   mid          1024 @ 8     middle_block
====  ===========  ===========  ===================  ====  ========  ===========  =========================

So diffssl's block 24 at t = 150 (DifFeed/linear/attention heads) is our ``up1.1`` at timestep 150: guided-
diffusion's timesteps are 0-indexed like ours, and its linear 1000-step β schedule is our default. Block 18 is
``down5`` (the last level has no down-sampler, so its last ResBlock's output is the block's output) and 37 is
``up5`` (= ``up5.2``).
"""

from __future__ import annotations

import re

from ..errors import InputError, check_name

__all__ = ["diffssl_block_name", "diffssl_block_number", "resolve_block"]


def diffssl_block_name(b: int, num_levels: int = 6, num_res_blocks: int = 2) -> str:
    """diffssl's 1-based block number (input blocks, middle, output blocks) → our ``DDAEBackbone`` name."""
    L, R = num_levels, num_res_blocks
    n_in = L * (R + 1)  # the stem conv, R per level, a down-sampler per level but the last
    if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 2 * n_in + 1:
        raise InputError(
            f"diffssl block {b!r} out of range: valid blocks are 1..{2 * n_in + 1} "
            f"(1-{n_in} encoder, {n_in + 1} middle, {n_in + 2}-{2 * n_in + 1} decoder)"
        )
    if b == 1:
        return "conv_in"
    if b <= n_in:
        level, j = divmod(b - 2, R + 1)
        last_of_last = level == L - 1 and j == R - 1
        return f"down{level}" if j == R or last_of_last else f"down{level}.{j}"
    if b == n_in + 1:
        return "mid"
    i, j = divmod(b - n_in - 2, R + 1)
    return f"up{i}" if j == R else f"up{i}.{j}"


def diffssl_block_number(name: str, num_levels: int = 6, num_res_blocks: int = 2) -> int:
    """Our block/unit name → diffssl's block number (the inverse of :func:`diffssl_block_name`; ``up{L-1}.{R}``
    and ``down{L-1}.{R-1}`` are accepted as aliases of ``up{L-1}`` and ``down{L-1}``)."""
    L, R = num_levels, num_res_blocks
    table = {diffssl_block_name(b, L, R): b for b in range(1, 2 * L * (R + 1) + 2)}
    table.setdefault(f"up{L - 1}.{R}", table[f"up{L - 1}"])
    table.setdefault(f"down{L - 1}.{R - 1}", table[f"down{L - 1}"])
    return table[check_name("block", name, table)]


_DIFFSSL_NUMBER = re.compile(r"^(?:b|block)?\s*(\d+)$")


def resolve_block(block: int | str, num_levels: int, num_res_blocks: int) -> str:
    """A diffssl block number (``24``, ``"24"``, ``"b24"``) → our name; our names pass through."""
    if isinstance(block, int) and not isinstance(block, bool):
        return diffssl_block_name(block, num_levels, num_res_blocks)
    m = _DIFFSSL_NUMBER.match(str(block))
    return diffssl_block_name(int(m.group(1)), num_levels, num_res_blocks) if m else str(block)
