import dataclasses

import pytest

from drc_core.config import ConfigError, DRCConfig, parse_override_args
from drc_core.presets import PRESETS, get_config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_resolves_and_round_trips(name):
    cfg = get_config(name)
    assert cfg.preset == name
    again = DRCConfig.from_dict(cfg.to_dict())
    assert again == cfg


def test_paper_presets_carry_the_papers_numbers():
    tmds = get_config("paper-tmds")
    assert (tmds.model.fg_dim, tmds.model.bg_dim, tmds.model.reassign_dim) == (256, 4, 1024)
    assert (tmds.model.fg_classes, tmds.model.bg_classes) == (30, 10)
    assert tmds.model.up_widths == (1024, 512, 256, 128, 64) and tmds.model.resolution == 128
    lv = tmds.langevin
    assert (lv.posterior_steps, lv.posterior_step_size, lv.prior_steps, lv.prior_step_size) == (40, 0.1, 60, 0.4)
    assert lv.test_steps == 5000 and tmds.loss.sigma == 0.25 and tmds.optim.batch_size == 48
    assert get_config("paper-birds").loss.ortho_weight == 0.1
    assert get_config("paper-cars").model.bg_dim == 192
    assert get_config("paper-dogs").langevin.test_steps == 300


@pytest.mark.parametrize("name", sorted(n for n in PRESETS if n.startswith("paper-")))
def test_paper_presets_keep_every_switch_beyond_the_paper_off(name):
    cfg = get_config(name)
    assert cfg.loss.area_weight == 0.0 and cfg.loss.competition_window == 1
    assert cfg.model.center_prior == 0.0


def test_cli_overrides_are_coerced_to_field_types():
    cfg = get_config("cpu-32", parse_override_args(
        ["--langevin.posterior_steps=7", "loss.sigma=0.3", "ablation.tv=false", "model.up_widths=32,16,8"]))
    assert cfg.langevin.posterior_steps == 7 and cfg.loss.sigma == 0.3
    assert cfg.ablation.tv is False and cfg.model.up_widths == (32, 16, 8)


@pytest.mark.parametrize("override, field", [
    ({"langevin.posterior_stepz": 3}, "langevin.posterior_stepz"),
    ({"nonsense.key": 1}, "nonsense.key"),
    ({"model.resolution": 48}, "model.resolution"),
    ({"langevin.prior_step_size": -0.1}, "langevin.prior_step_size"),
    ({"model.resolution": 64}, "model.up_widths"),
    ({"ablation.tv": "maybe"}, "ablation.tv"),
    ({"langevin.posterior_steps": "ten"}, "langevin.posterior_steps"),
    ({"loss.responsibility": "voxel"}, "loss.responsibility"),
    ({"loss.competition_window": 4}, "loss.competition_window"),
    ({"loss.area_weight": -0.1}, "loss.area_weight"),
])
def test_bad_config_fails_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        get_config("cpu-32", override)


def test_unknown_preset_lists_choices():
    with pytest.raises(ConfigError, match="cpu-64"):
        get_config("paper-mnist")


def test_flat_params_cover_every_field():
    cfg = get_config("cpu-64")
    flat = cfg.flat()
    sections = [getattr(cfg, f.name) for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))]
    assert flat["langevin.posterior_steps"] == 10
    assert len(flat) == sum(len(dataclasses.fields(s)) for s in sections) + 2  # + preset + seed


def test_a_run_file_gives_overrides_and_the_command_line_wins(tmp_path):
    from drc_core.config import ConfigError, merged_overrides
    run = tmp_path / "run.yaml"
    run.write_text("langevin:\n  posterior_steps: 7\n  test_steps: 50\nmodel.up_widths: [32, 16, 8]\nloss.sigma: 0.4\n")
    cfg = get_config("cpu-32", merged_overrides(run, ["loss.sigma=0.3"]))
    assert cfg.langevin.posterior_steps == 7 and cfg.langevin.test_steps == 50
    assert cfg.model.up_widths == (32, 16, 8) and cfg.loss.sigma == 0.3          # the command line wins
    (tmp_path / "bad.yaml").write_text("langevin: {posterior_stepz: 3}\n")
    with pytest.raises(ConfigError, match="langevin.posterior_stepz"):
        get_config("cpu-32", merged_overrides(tmp_path / "bad.yaml", []))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"--config .*list.yaml: expected a mapping"):
        merged_overrides(tmp_path / "list.yaml", [])
    with pytest.raises(ConfigError, match=r"--config .*missing.yaml: cannot read"):
        merged_overrides(tmp_path / "missing.yaml", [])
