"""Config presets, dotlist overrides and validation errors that name the problem."""
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import tcore

from tcore.config import CONFIG_DIR, ConfigError, load_config, preset_names, resolve_config_path, save_config


def test_presets_exist_and_load():
    assert {"tiny_cpu", "vits16_k400", "vitb16_k400", "vits16_imagenet"} <= set(preset_names())
    for name in preset_names():
        cfg = load_config(name)
        assert cfg.optim.clip_grad == 3.0 and cfg.optim.pmm_lr_mult == 0.1
        # the released code's effective optimiser: one lr for every student parameter, the
        # head's last layer not frozen (README, "Where tcore follows the released code")
        assert (cfg.optim.layer_decay, cfg.optim.patch_embed_lr_mult,
                cfg.optim.freeze_last_layer_epochs) == (1.0, 1.0, 0), name
        if name != "tiny_cpu":   # the CPU demo preset raises lr and lowers teacher momentum
            assert cfg.optim.base_lr == 0.002 and cfg.optim.momentum_teacher == 0.992
    k400 = load_config("vits16_k400")
    assert k400.model.arch == "vit_small" and k400.optim.official_epoch_length == 936
    assert k400.optim.warmup_epochs == 20 and k400.optim.epochs == 400
    assert list(k400.data.past_offset_range) == [0.15, 0.25]
    assert load_config("vitb16_k400").model.arch == "vit_base"
    for name in ("vits16_k400", "vitb16_k400", "vits16_imagenet"):
        # the reference's precision and per-GPU batch (METHOD.md section 6)
        assert load_config(name).train.precision == "fp16"
        assert load_config(name).data.batch_size_per_gpu == 64, name
    tiny = load_config("tiny_cpu")
    assert tiny.model.arch == "vit_tiny" and tiny.data.batch_size_per_gpu == 16


def test_paper_presets_use_the_reference_colour_jitter():
    from tcore.train import pipeline_config

    for name in ("vits16_k400", "vitb16_k400", "vits16_imagenet"):
        assert pipeline_config(load_config(name)).views.color_jitter == "torchvision", name
    base = Path(tcore.__file__).parent / "configs" / "base.yaml"
    assert pipeline_config(load_config(base)).views.color_jitter == "torchvision"
    # the demo's preset: no hue or saturation, so "fast" is only a fixed order (its comment)
    assert pipeline_config(load_config("tiny_cpu")).views.color_jitter == "fast"


def test_config_by_path_and_by_file_name(tmp_path):
    path = resolve_config_path("vits16_k400")
    assert path.name == "vits16_k400.yaml"
    assert load_config("configs/vits16_k400.yaml").model.arch == "vit_small"  # as documented
    own = tmp_path / "mine.yaml"
    own.write_text("optim:\n  epochs: 17\n")
    assert load_config(str(own)).optim.epochs == 17


def test_overrides_apply_and_round_trip(tmp_path):
    cfg = load_config("tiny_cpu", ["optim.epochs=9", "train.seed=5", "model.drop_path=0.2",
                                   "data.past_offset_range=[0.1,0.2]",
                                   "data.pipeline.views.n_local=4"])
    assert cfg.optim.epochs == 9 and cfg.train.seed == 5 and cfg.model.drop_path == 0.2
    assert list(cfg.data.past_offset_range) == [0.1, 0.2]
    assert cfg.data.pipeline.views.n_local == 4
    saved = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert OmegaConf.load(saved) == cfg
    assert load_config(str(saved)) == cfg          # a saved config loads back as a config


@pytest.mark.parametrize("overrides, message", [
    (["nosuch.key=1"], "unknown section"),
    (["optim.epochs=0"], "optim.epochs must be an integer > 0"),
    (["optim.base_lr=-1"], "optim.base_lr must be a number >= 0, got -1"),
    (["optim.warmup_epochs=500"], "optim.warmup_epochs (500) exceeds optim.epochs (400)"),
    (["train.precision=fp8"], "train.precision must be one of ('auto', 'bf16', 'fp16', 'fp32'), got 'fp8'"),
    (["data.past_offset_range=[0.2,0.4]"], "current_range[0] - data.past_offset_range[1]"),
    (["data.future_offset_range=[0.3,0.5]"], "current_range[1] + data.future_offset_range[1]"),
    (["data.current_range=[0.5]"], "data.current_range must be a [low, high] pair"),
    (["train.keep_last=0"], "train.keep_last must be an integer > 0, got 0"),
    (["train.compile_mode=reduce-overhead"], "train.compile_mode must be one of"),
    (["train.compile_mode=max-autotune-no-cudagraphs", "train.compile_backend=aot_eager"],
     "needs train.compile_backend=inductor"),
    (["optim.epochs"], "expected key=value"),
    (["optim.epoch=3"], "unknown key optim.epoch (known there: adamw_beta1"),   # strict section
    (["data.current_range[0]=0.1"], "a list is set whole"),
    (["train=3"], "train is a section: set its keys"),
    (["data.pipeline=[1,2]"], "a list and a mapping do not merge"),
    (["data.batch_sise_per_gpu=4"], "unknown key data.batch_sise_per_gpu"),   # data is strict
    (["optim.scaling_rule=linear"], "optim.scaling_rule must be sqrt_wrt_1024 or none"),
    (["optim.final_momentum_teacher=0.9"], "optim.momentum_teacher <= optim.final_momentum"),
    (["train.parallel=deepspeed"], "train.parallel must be ddp or fsdp"),
    (["train.device=tpu"], "train.device must be auto, cpu or cuda"),
    (["train.step_stream=fastest"], "train.step_stream must be one of ('default', 'high_priority')"),
    (["train.checkpoint_every=0"], "train.checkpoint_every must be an integer > 0"),
    (["train.log_every=0"], "train.log_every must be an integer > 0"),
    (["data.current_range=[0.6,0.4]"], "data.current_range must satisfy 0 <= low <= high"),
    (["train.compile=maybe"], "train.compile must be true or false"),
    (["optim.warmup_teacher_temp_epochs=-1"], "optim.warmup_teacher_temp_epochs must be an"),
    (["optim.official_epoch_length=0"], "optim.official_epoch_length must be an integer > 0"),
    (["optim.epochs=2.5"], "optim.epochs must be an integer > 0"),
    (["optim.clip_grad=-1"], "optim.clip_grad must be a number >= 0"),
    (["optim.teacher_temp=-0.07"], "optim.teacher_temp must be a number >= 0"),
    (["train.compile_backend="], "train.compile_backend must be a torch.compile backend"),
])
def test_bad_overrides_are_named(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config("vits16_k400", overrides)
    assert message in str(info.value)


def test_a_bad_value_is_blamed_on_the_override_that_set_it(tmp_path):
    # The message names the override (and the file it was applied over), not the file alone.
    with pytest.raises(ConfigError) as info:
        load_config("tiny_cpu", ["train.seed=3", "data.batch_size_per_gpu=0"])
    message = str(info.value)
    assert message.startswith("override 'data.batch_size_per_gpu=0' (over ")
    assert "tiny_cpu.yaml): data.batch_size_per_gpu must be an integer > 0" in message
    assert "train.seed" not in message
    # A bad value in the user's file still names that file, even with unrelated overrides.
    own = tmp_path / "own.yaml"
    own.write_text("optim:\n  epochs: 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(own), ["train.seed=3"])
    assert str(info.value).startswith(f"{own}: optim.epochs must be an integer > 0")
    # A rule about a section blames the override that set a key inside it.
    with pytest.raises(ConfigError) as info:
        load_config("tiny_cpu", ["train.seed=3", "data.pipeline.sampling.current_range=[0.4,0.6]"])
    assert str(info.value).startswith("override 'data.pipeline.sampling.current_range=[0.4,0.6]'"
                                      " (over ")
    assert "data.pipeline.sampling ({'current_range': [0.4, 0.6]}) is not used" in str(info.value)
    # ... and an override that sets a whole section is blamed for a key inside it.
    with pytest.raises(ConfigError, match=r"^override 'data\.pipeline\.views=\{n_local: -1\}' "
                                          r"\(over .*tiny_cpu\.yaml\): data\.pipeline\.views"
                                          r"\.n_local = -1"):
        load_config("tiny_cpu", ["train.seed=3", "data.pipeline.views={n_local: -1}"])


def test_unknown_model_and_loss_keys_name_their_source(tmp_path):
    # model and loss are checked against tcore.ssl's defaults as the config is loaded, so the
    # message names the override or the file, with the key's full path and its neighbours.
    with pytest.raises(ConfigError) as info:
        load_config("tiny_cpu", ["train.seed=3", "model.head.protos=8"])
    assert str(info.value) == ("override 'model.head.protos=8': unknown key model.head.protos "
                               "(known there: bottleneck, hidden, layers, prototypes)")
    with pytest.raises(ConfigError, match=r"^override 'loss\.kolo=1': unknown key loss\.kolo "
                                          r"\(known there: center_momentum, "):
        load_config("tiny_cpu", ["loss.kolo=1"])
    own = tmp_path / "own.yaml"
    own.write_text("model:\n  layerscal: 0.1\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(own))}: unknown key model\.layerscal "
                                          r"\(known there: arch, "):
        load_config(str(own), ["train.seed=3"])
    # Known keys, from files and overrides, still load.
    assert load_config("tiny_cpu", ["model.head.prototypes=8"]).model.head.prototypes == 8


@pytest.mark.parametrize("override, message", [
    ("model.arch=vit_smal", "model.arch must be one of vit_base, vit_large, vit_small, vit_tiny, "
                            "got 'vit_smal'"),
    ("model.attention=bogus", "model.attention must be one of auto, xformers, sdpa, math, got "
                              "'bogus'"),
    ("loss.student_temp=abc", "loss.student_temp must be a number, got 'abc'"),
    ("model.head.prototypes=1.5", "model.head.prototypes must be an integer, got 1.5"),
])
def test_model_and_loss_values_of_the_wrong_kind_name_their_override(override, message):
    with pytest.raises(ConfigError) as info:
        load_config("tiny_cpu", [override])
    assert str(info.value) == f"override {override!r}: {message}"


@pytest.mark.parametrize("override, message", [
    # Each failed inside the run before (a traceback at step 1, or a floating point exception
    # with no message for a zero-width head), after the run directory was made.
    ("model.drop_path=2.0", "model.drop_path must lie in [0, 1), got 2.0"),
    ("model.head.prototypes=0", "model.head.prototypes must be >= 1, got 0"),
    ("model.pmm.heads=7", "model.pmm.heads must divide model.arch vit_tiny's width 192, got 7"),
    ("model.img_size=8", "model.img_size must be at least model.patch_size (16), got 8"),
    ("loss.student_temp=0", "loss.student_temp must be > 0, got 0"),
    ("loss.center_momentum=1.5", "loss.center_momentum must lie in [0, 1], got 1.5"),
    ("loss.koleo_weight=-1", "loss.koleo_weight must be >= 0, got -1"),
    ("optim.adamw_beta1=1.5", "optim.adamw_beta1 must be a number in [0, 1), got 1.5"),
    # a "decay" above 1 trained the first blocks fastest; 0 froze all but the last block
    ("optim.layer_decay=1.5", "optim.layer_decay must be in (0, 1] (1: no layer-wise decay), "
                              "got 1.5"),
    ("optim.layer_decay=0", "optim.layer_decay must be in (0, 1] (1: no layer-wise decay), got 0"),
    ("optim.weight_decay=abc", "optim.weight_decay must be a number >= 0, got 'abc'"),
    ("optim.weight_decay_end=-0.1", "optim.weight_decay_end must be a number >= 0, got -0.1"),
    ("optim.momentum_teacher=abc", "optim.momentum_teacher must be a number, got 'abc'"),
    ("train.seed=abc", "train.seed must be an integer >= 0, got 'abc'"),
    ("train.seed=-1", "train.seed must be an integer >= 0, got -1"),
])
def test_values_out_of_range_name_their_key_and_override(override, message):
    with pytest.raises(ConfigError) as info:
        load_config("tiny_cpu", [override])
    assert str(info.value) == f"override {override!r} (over {CONFIG_DIR / 'tiny_cpu.yaml'}): " \
                              f"{message}"


def test_a_rule_tying_two_model_keys_is_checked_once_all_overrides_are_in():
    # vit_small's width 384 takes 12 heads, vit_tiny's 192 too; 7 is refused for either,
    # whichever of the two overrides comes first.
    cfg = load_config("tiny_cpu", ["model.pmm.heads=12", "model.arch=vit_small"])
    assert (cfg.model.arch, cfg.model.pmm.heads) == ("vit_small", 12)
    # Both overrides are named: the rule is about the two keys together.
    with pytest.raises(ConfigError, match=r"^overrides 'model\.pmm\.heads=7', 'model\.arch="
                                          r"vit_small' \(over .*\): model\.pmm\.heads "
                                          r"must divide model\.arch vit_small's width 384"):
        load_config("tiny_cpu", ["model.pmm.heads=7", "model.arch=vit_small"])


def test_an_integer_is_a_number_for_model_and_loss_values():
    # `model.layerscale=0` is LayerScale 0.0, not a value of the wrong kind.
    assert load_config("tiny_cpu", ["model.layerscale=0"]).model.layerscale == 0
    assert load_config("tiny_cpu", ["loss.koleo_weight=1"]).loss.koleo_weight == 1


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="no such file and no preset"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="no such file and no preset"):
        load_config("base")              # the defaults presets merge over, not a preset
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: cannot parse YAML"):
        load_config(str(broken))
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  log_evry: 3\n")
    with pytest.raises(ConfigError, match=r"typo\.yaml.*log_evry"):
        load_config(str(typo))
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(str(listy))


def test_compile_mode_reaches_the_compiler():
    """`train.compile_mode` is what Inductor is configured with for the train step."""
    import torch

    from tcore.bench.model import bench_config, build_trainer

    for mode, autotune in (("default", False), ("max-autotune-no-cudagraphs", True)):
        cfg = bench_config("vit_tiny", "sdpa", "fp32", True, 2, torch.device("cpu"), 1,
                           f"train.compile_mode={mode}")
        trainer = build_trainer(cfg, torch.device("cpu"))
        assert trainer.forward.dynamo_ctx.compiler_config["max_autotune"] is autotune, mode
