"""U-Net configurations (diffusers ``UNet2DModel`` arguments) of the DDAE backbones and the DRL score networks,
and the order of a ``UNet2DModel``'s layers for timm's parameter grouping."""

from __future__ import annotations

from ..errors import check_name

UNET_PRESETS: dict[str, dict] = {
    # Small CPU U-Net for 28×28 grey images, chosen by measurement (benchmarks/throughput.py, README):
    # three levels 28→14→7, one residual block per level, self-attention only in the 7×7 middle block,
    # where it costs little (49 tokens).
    "fmnist_small": {
        "sample_size": 28,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": (32, 64, 64),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D", "UpBlock2D"),
        "norm_num_groups": 32,
        "add_attention": True,
    },
    # The DDPM paper's 35.7M CIFAR-10 U-Net, i.e. the config of diffusers' google/ddpm-cifar10-32 and
    # DDAE's DDPM_ddpm network.
    "cifar10_ddpm": {
        "sample_size": 32,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": (128, 256, 256, 256),
        "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        "downsample_padding": 0,
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "norm_eps": 1e-6,
        "norm_num_groups": 32,
        "attention_head_dim": None,
        "time_embedding_type": "positional",
        "dropout": 0.1,
    },
}


SCORE_NET_PRESETS: dict[str, dict] = {
    # DDAE's small CPU U-Net (same blocks and width, so DRL and DDAE rows cost about the same per image), as an
    # NCSN++-style VE score network: the noise level σ is the U-Net's "timestep", embedded as Gaussian Fourier
    # features of log σ (diffusers' time_embedding_type="fourier", scale 16), and the output is divided by σ,
    # so s_θ = unet_out / σ and σ s_θ is a noise prediction. class_embed_type="identity" adds the projected code
    # to the time embedding (see methods/drl.py).
    "fmnist_small": {**UNET_PRESETS["fmnist_small"], "time_embedding_type": "fourier", "class_embed_type": "identity"},
    # A narrower, attention-free score net (0.41 GFLOP per training image vs 1.11): ~2.7× the steps per CPU
    # minute, for the level-of-detail benchmark where the encoder, not the sample quality, is under study.
    "fmnist_tiny": {
        "sample_size": 28,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": (16, 32, 64),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D", "UpBlock2D"),
        "norm_num_groups": 16,
        "add_attention": False,
        "time_embedding_type": "fourier",
        "class_embed_type": "identity",
    },
    "cifar10_small": {
        "sample_size": 32,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": (64, 128, 128),
        "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D", "UpBlock2D"),
        "norm_num_groups": 32,
        "add_attention": True,
        "time_embedding_type": "fourier",
        "class_embed_type": "identity",
    },
}


def unet_config_of(config: dict | str, in_chans: int | None = None) -> dict:
    """A copy of ``config`` (a :data:`UNET_PRESETS` name or a config dict), with ``in_chans`` input and output
    channels if given."""
    config = dict(UNET_PRESETS[check_name("U-Net preset", config, UNET_PRESETS)] if isinstance(config, str) else config)
    if in_chans is not None:
        config["in_channels"] = config["out_channels"] = in_chans
    return config


def unet_group_matcher(prefix: str = "", coarse: bool = False) -> dict:
    """timm's ``group_matcher`` of a ``UNet2DModel`` whose parameter names start with ``prefix``: in forward
    order the stem (``conv_in``, time and class embeddings), each down block, the middle block, each up block,
    the output conv. Fine (``coarse=False``): each residual block with its attention; a block's down/up
    sampler joins the unit before it."""
    p = prefix.replace(".", r"\.")

    def blocks(kind: str) -> str | list:
        if coarse:
            return rf"^{p}{kind}\.(\d+)"
        return [(rf"^{p}{kind}\.(\d+)\.(?:resnets|attentions)\.(\d+)", None), (rf"^{p}{kind}\.(\d+)\.", (99999,))]

    return {
        "stem": rf"^{p}(?:conv_in|time_embedding|class_embedding)",
        "down": blocks("down_blocks"),
        "mid": rf"^{p}mid_block" if coarse else rf"^{p}mid_block\.(?:resnets|attentions)\.(\d+)",
        "up": blocks("up_blocks"),
        "out": rf"^{p}conv_(?:norm_)?out",
    }
