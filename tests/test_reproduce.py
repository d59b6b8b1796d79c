"""`diffssl reproduce`: every published-result config builds and runs one step on the CPU (--dry-run), the list
shows them all, and bad names or keys give clear errors."""

from __future__ import annotations

import pytest
import yaml

from diffssl_plugin.cli import main
from diffssl_plugin.errors import DiffSSLError, InputError
from diffssl_plugin.methods.reference_configs import CONFIG_DIR
from diffssl_plugin.published import config_names, load_reproduction, reference_field

CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
#: dry runs that take well under ~20 s on a quiet 2-core CPU; the rest are marked slow
FAST = {"simclr_cifar10"}


def test_every_config_loads_and_names_its_published_rows():
    assert CONFIGS and config_names() == CONFIGS
    for name in CONFIGS:
        rep = load_reproduction(name)
        assert rep.published and rep.compute["gpu_hours"] is not None, name
        for row in rep.published:
            assert row["hand"] in ("first-hand", "second-hand") and row["source"], (name, row["id"])


def test_list_shows_every_config(capsys):
    assert main(["reproduce", "--list"]) == 0
    out = capsys.readouterr().out
    for name in CONFIGS:
        assert f"| {name} |" in out
    assert "90.05" in out and "0.847" in out and "[2nd-hand]" in out


def test_unknown_name_lists_the_known_configs(capsys):
    assert main(["reproduce", "no_such_config", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "no_such_config" in err and "ddae_cifar10" in err and "simclr_cifar10" in err


@pytest.mark.parametrize(
    "edit, word",
    [
        (lambda c: c.update(bogus_key=1), "bogus_key"),
        (lambda c: c.pop("compute"), "compute"),
        (lambda c: c["published"][0].pop("source"), "source"),
        (lambda c: c["published"][0].update(colour="red"), "colour"),
        (lambda c: c["eval"].update(timestep=3), "timestep"),
    ],
)
def test_bad_config_keys_raise_input_error_naming_them(tmp_path, edit, word):
    config = yaml.safe_load((CONFIG_DIR / "simclr_cifar10.yaml").read_text())
    edit(config)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(InputError, match=word):
        load_reproduction(str(path))


def test_unknown_values_are_named(tmp_path):
    config = yaml.safe_load((CONFIG_DIR / "simclr_cifar10.yaml").read_text())
    config["published"][0]["hand"] = "third-hand"
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(DiffSSLError, match="third-hand"):
        load_reproduction(str(path))


def test_gap_is_in_points_and_skipped_for_context_rows():
    rep = load_reproduction("simclr_cifar10")
    main_row, context_row = rep.published[0], rep.published[1]
    ref = reference_field(rep, main_row, 0.80, dry_run=False)
    assert ref["gap_points"] == pytest.approx(100 * (0.80 - 0.847))
    assert reference_field(rep, context_row, 0.80, dry_run=False)["gap_points"] is None


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in CONFIGS])
def test_dry_run(name, tmp_path, capsys):
    """Model at the config's architecture, one training step (or one feature/head pass), records written."""
    out = tmp_path / "out"
    assert main(["reproduce", name, "--dry-run", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "dry run on" in printed and "| row | metric | paper | ours |" in printed
    records = (out / "records.jsonl").read_text().splitlines()
    assert records, "no records written"
    assert any('"reference"' in line for line in records) or "unmeasured" in printed


def test_adm_configs_agree_with_the_checkpoint_converter():
    """The ADM architecture and block names written in the eval-only configs are the converter's."""
    adm = pytest.importorskip("diffssl_plugin.checkpoints.adm")
    numbering = pytest.importorskip("diffssl_plugin.checkpoints.diffssl_blocks")
    expected = adm.adm_unet_config(adm.adm_config("adm256_uncond"))
    for name in ("diffssl_attention_imagenet", "difformer_imagenet", "diffeed_imagenet"):
        rep = load_reproduction(name)
        unet = rep.checkpoint["backbone"]["unet_config"]
        for key, value in unet.items():
            got = tuple(value) if isinstance(value, list) else value
            assert got == expected[key], (name, key)
        assert rep.checkpoint["settings"]["block"] == numbering.diffssl_block_name(24)
    blocks = load_reproduction("difformer_imagenet").eval_fields["extra"]["difformer"]["blocks"]
    assert blocks == [numbering.diffssl_block_name(b) for b in (19, 24, 30)]


def test_ddae_cifar10_readout_is_ddae_out6_at_t11():
    ddpm = pytest.importorskip("diffssl_plugin.checkpoints.diffusers_ddpm")
    rep = load_reproduction("ddae_cifar10")
    assert rep.eval_fields["blocks"] == [ddpm.ddae_block_name("out_6", 2)]
    assert rep.eval_fields["timesteps"] == [ddpm.ddae_timestep(11)]
