"""Training configuration: OmegaConf presets, dotlist overrides, validation.

A config is `configs/base.yaml` with a preset merged over it, then `key=value` overrides.
`data`, `optim` and `train` only accept the keys base.yaml defines; `model` and `loss` go to
`tcore.ssl.TCoRe` and are checked against its defaults as they are loaded. So a typo anywhere
is an error that names the key and the file or override it came from.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tcore.preprocess.files import write_text_atomically
from tcore.step_stream import STEP_STREAMS

CONFIG_DIR = Path(__file__).parent / "configs"
STRICT_SECTIONS = ("data", "optim", "train")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# torch.compile modes for the loss computation. Not the CUDA-graph ones ("reduce-overhead",
# "max-autotune"): a replay overwrites the previous step's outputs, and training keeps each
# step's loss tensors until it logs them.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the source."""


def preset_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p.stem != "base")


def resolve_config_path(config: str | os.PathLike) -> Path:
    """A path to a YAML file, or a preset name (`tiny_cpu`, `vits16_k400`, ...)."""
    path = Path(config)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / f"{path.name}", CONFIG_DIR / f"{path.stem}.yaml"):
        if candidate.is_file() and candidate.stem != "base":
            return candidate
    raise ConfigError(f"config {str(config)!r}: no such file and no preset of that name "
                      f"(presets: {', '.join(preset_names())})")


def _load_yaml(path: Path) -> DictConfig:
    try:
        loaded = OmegaConf.load(path)
    except Exception as exc:  # yaml errors come in several types
        raise ConfigError(f"{path}: cannot parse YAML: {exc}") from exc
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
    return loaded


def _strict_base() -> DictConfig:
    base = _load_yaml(CONFIG_DIR / "base.yaml")
    for section in STRICT_SECTIONS:
        OmegaConf.set_struct(base[section], True)
    # data.pipeline is passed through to the pipeline's own config class, which checks it.
    OmegaConf.set_struct(base.data.pipeline, False)
    return base


def _merge(base: DictConfig, other: DictConfig, source: str) -> DictConfig:
    unknown = set(other.keys()) - set(base.keys())
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {sorted(unknown)}; "
                          f"known: {sorted(base.keys())}")
    for key in other.keys():
        if OmegaConf.is_dict(base[key]) and not OmegaConf.is_dict(other[key]):
            raise ConfigError(f"{source}: {key} is a section: set its keys (e.g. "
                              f"{key}.{next(iter(base[key]), 'key')}=...), not {key} itself")
    try:
        return OmegaConf.merge(base, other)
    except (OmegaConfBaseException, TypeError) as exc:  # TypeError: a list over a mapping
        raise ConfigError(f"{source}: {_merge_problem(exc)}") from exc


def _merge_problem(exc: Exception) -> str:
    """OmegaConf's merge error in the config's terms: the unknown key with its full path and
    the keys its section has; a list against a mapping said plainly."""
    message = getattr(exc, "msg", None) or str(exc)
    full_key, parent = getattr(exc, "full_key", None), getattr(exc, "parent_node", None)
    if full_key and "not in struct" in message:
        known = sorted(parent.keys()) if parent is not None and hasattr(parent, "keys") else []
        return f"unknown key {full_key}" + (f" (known there: {', '.join(map(str, known))})"
                                            if known else "")
    if "incompatible container types" in message:
        return "a list and a mapping do not merge: give the key the kind of value it holds"
    return message


def load_config(config: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()
                ) -> DictConfig:
    """Load a preset or YAML file over base.yaml, apply `key=value` overrides, validate."""
    path = resolve_config_path(config)
    cfg = _merge(_strict_base(), _load_yaml(path), str(path))
    _check_model_and_loss_keys(cfg, str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. optim.epochs=10)")
        if "[" in item.split("=", 1)[0]:
            # OmegaConf cannot merge one item into a list
            raise ConfigError(f"override {item!r}: a list is set whole, e.g. "
                              "data.current_range=[0.3,0.7], not item by item")
        try:
            dotlist = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as exc:
            raise ConfigError(f"override {item!r}: {exc}") from exc
        cfg = _merge(cfg, dotlist, f"override {item!r}")
        if item.split("=", 1)[0].strip().split(".")[0] in ("model", "loss"):
            _check_model_and_loss_keys(cfg, f"override {item!r}")
    try:
        validate_config(cfg, source=str(path))
    except ConfigError as exc:
        raise ConfigError(_blame(str(exc), str(path), overrides)) from exc
    return cfg


def _check_model_and_loss_keys(cfg: DictConfig, source: str) -> None:
    """`model` and `loss` merged over `tcore.ssl`'s defaults as the model will merge them, so
    an unknown key or a value of the wrong kind there is named with its source now, not when
    the model is built."""
    _merged_model_and_loss(cfg, source)


def _merged_model_and_loss(cfg: DictConfig, source: str) -> tuple[dict, dict]:
    from tcore.ssl import default_loss_config, default_model_config, merge_over_defaults

    merged = []
    for section, defaults in (("model", default_model_config()),
                              ("loss", default_loss_config())):
        try:
            merged.append(merge_over_defaults(defaults, cfg[section], section))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{source}: {exc}") from exc
    return merged[0], merged[1]


def _check_model_and_loss_values(cfg: DictConfig, source: str) -> None:
    """Their ranges, once every override is in (a rule may tie two keys: the PMM's heads
    and the arch's width)."""
    from tcore.ssl import check_loss_values, check_model_values

    model, loss = _merged_model_and_loss(cfg, source)
    try:
        check_model_values(model)
        check_loss_values(loss)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from exc


def _blame(message: str, path: str, overrides) -> str:
    """The validation error with its source corrected: the overrides whose keys it names,
    where there are some, rather than the file they were applied over."""
    named = [item for item in overrides if _names_key_of(message, item.split("=", 1)[0].strip())]
    if not named:
        return message
    problem = message[len(path) + 2:] if message.startswith(f"{path}: ") else message
    given = ", ".join(repr(item) for item in named)
    return f"override{'s' if len(named) > 1 else ''} {given} (over {path}): {problem}"


def _names_key_of(message: str, key: str) -> bool:
    """Whether `message` names `key` (`a.b.c`), a key inside it (an override may set a whole
    section, `a.b.c={...}`), or a section holding it (`a.b`, not `a` alone): a rule about a
    section blames the overrides inside it."""
    if re.search(rf"(?<![\w.]){re.escape(key)}(?!\w)", message):
        return True
    parts = key.split(".")
    return any(re.search(rf"(?<![\w.]){re.escape('.'.join(parts[:n]))}(?!\w|\.\w)", message)
               for n in range(len(parts) - 1, 1, -1))


def _require(condition: bool, source: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{source}: {message}")


def _check_range(cfg: DictConfig, key: str, source: str) -> tuple[float, float]:
    value = cfg.data[key]
    _require(isinstance(value, (list, ListConfig)) and len(value) == 2, source,
             f"data.{key} must be a [low, high] pair, got {value}")
    low, high = float(value[0]), float(value[1])
    _require(0.0 <= low <= high <= 1.0, source,
             f"data.{key} must satisfy 0 <= low <= high <= 1, got {list(value)}")
    return low, high


def validate_config(cfg: DictConfig, source: str = "config") -> None:
    """Check values a typo or a bad override could break; raise ConfigError naming the key."""
    optim, train, data = cfg.optim, cfg.train, cfg.data
    for key in ("base_lr", "min_lr", "clip_grad", "teacher_temp", "warmup_teacher_temp",
                "layer_decay", "patch_embed_lr_mult", "pmm_lr_mult", "weight_decay",
                "weight_decay_end"):
        _require(_is_number(optim[key]) and optim[key] >= 0, source,
                 f"optim.{key} must be a number >= 0, got {optim[key]!r}")
    for key in ("adamw_beta1", "adamw_beta2"):
        _require(_is_number(optim[key]) and 0 <= optim[key] < 1, source,
                 f"optim.{key} must be a number in [0, 1), got {optim[key]!r}")
    # A decay: 1 is none (the presets), 0 would freeze every block but the last.
    _require(0 < optim.layer_decay <= 1, source,
             f"optim.layer_decay must be in (0, 1] (1: no layer-wise decay), got "
             f"{optim.layer_decay!r}")
    for key in ("epochs", "official_epoch_length"):
        _require(isinstance(optim[key], int) and optim[key] > 0, source,
                 f"optim.{key} must be an integer > 0, got {optim[key]!r}")
    for key in ("warmup_epochs", "freeze_last_layer_epochs", "warmup_teacher_temp_epochs"):
        _require(isinstance(optim[key], int) and optim[key] >= 0, source,
                 f"optim.{key} must be an integer >= 0, got {optim[key]!r}")
    _require(optim.warmup_epochs <= optim.epochs, source,
             f"optim.warmup_epochs ({optim.warmup_epochs}) exceeds optim.epochs ({optim.epochs})")
    for key in ("momentum_teacher", "final_momentum_teacher"):
        _require(_is_number(optim[key]), source,
                 f"optim.{key} must be a number, got {optim[key]!r}")
    _require(0.0 <= optim.momentum_teacher <= optim.final_momentum_teacher <= 1.0, source,
             "teacher momentum must satisfy 0 <= optim.momentum_teacher <= "
             "optim.final_momentum_teacher <= 1")
    _require(optim.scaling_rule in ("sqrt_wrt_1024", "none"), source,
             f"optim.scaling_rule must be sqrt_wrt_1024 or none, got {optim.scaling_rule!r}")
    for key in ("batch_size_per_gpu", "num_threads"):
        _require(isinstance(data[key], int) and data[key] > 0, source,
                 f"data.{key} must be an integer > 0, got {data[key]!r}")
    current = _check_range(cfg, "current_range", source)
    past = _check_range(cfg, "past_offset_range", source)
    future = _check_range(cfg, "future_offset_range", source)
    # METHOD.md section 1: the past and future windows must stay inside the clip.
    _require(current[0] - past[1] >= 0, source,
             f"data.current_range[0] - data.past_offset_range[1] must be >= 0 "
             f"(got {current[0]} - {past[1]})")
    _require(current[1] + future[1] <= 1, source,
             f"data.current_range[1] + data.future_offset_range[1] must be <= 1 "
             f"(got {current[1]} + {future[1]})")
    _require(train.precision in PRECISIONS, source,
             f"train.precision must be one of {PRECISIONS}, got {train.precision!r}")
    _require(train.parallel in ("ddp", "fsdp"), source,
             f"train.parallel must be ddp or fsdp, got {train.parallel!r}")
    _require(train.device in ("auto", "cpu", "cuda"), source,
             f"train.device must be auto, cpu or cuda, got {train.device!r}")
    _require(train.step_stream in STEP_STREAMS, source,
             f"train.step_stream must be one of {STEP_STREAMS}, got {train.step_stream!r}")
    for key in ("checkpoint_every", "keep_last", "log_every"):
        _require(isinstance(train[key], int) and train[key] > 0, source,
                 f"train.{key} must be an integer > 0, got {train[key]!r}")
    _require(isinstance(train.seed, int) and not isinstance(train.seed, bool)
             and train.seed >= 0, source, f"train.seed must be an integer >= 0, got {train.seed!r}")
    _require(isinstance(train.compile, bool), source,
             f"train.compile must be true or false, got {train.compile!r}")
    _require(isinstance(train.compile_backend, str) and train.compile_backend, source,
             f"train.compile_backend must be a torch.compile backend name, "
             f"got {train.compile_backend!r}")
    _require(train.compile_mode in COMPILE_MODES, source,
             f"train.compile_mode must be one of {COMPILE_MODES}, got {train.compile_mode!r}")
    _require(train.compile_mode == "default" or train.compile_backend == "inductor", source,
             f"train.compile_mode={train.compile_mode} needs train.compile_backend=inductor "
             f"(got {train.compile_backend!r})")
    _check_model_and_loss_values(cfg, source)
    build_pipeline_config(cfg, source)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


SAMPLING_KEYS = ("current_range", "past_offset_range", "future_offset_range")


def _pipeline_values(data: DictConfig, source: str) -> dict:
    """`data.pipeline` as PipelineConfig values, the sampling ranges taken from `data`.
    `data.pipeline.sampling` would be overwritten by them, so it is refused unless it says
    the same (as a copied PipelineConfig dump does, e.g. the `config` of preview stats)."""
    values = OmegaConf.to_container(data.pipeline, resolve=True) \
        if isinstance(data.pipeline, DictConfig) else data.pipeline
    _require(isinstance(values, dict), source,
             f"data.pipeline must be a mapping of PipelineConfig keys, got {values!r}")
    given = values.get("sampling")
    ranges = {key: list(data[key]) for key in SAMPLING_KEYS}
    _require(given is None or (isinstance(given, dict) and set(given) <= set(SAMPLING_KEYS)
                               and all(given[key] == ranges[key] for key in given)), source,
             f"data.pipeline.sampling ({given}) is not used in a training config: set "
             "data.current_range, data.past_offset_range and data.future_offset_range instead")
    values["sampling"] = ranges
    return values


def _model_patch_size(cfg: DictConfig):
    if "patch_size" in cfg.model:
        return cfg.model.patch_size
    from tcore.ssl import default_model_config   # what TCoRe merges the model section over
    return default_model_config()["patch_size"]


def build_pipeline_config(cfg: DictConfig, source: str = "config"):
    """The tcore.pipelines PipelineConfig of a training config (`data.pipeline`, the ranges of
    `data`), checked against the model; ConfigError names the key."""
    from tcore.pipelines.config import PipelineConfig, PipelineConfigError
    try:
        pipeline = PipelineConfig.from_dict(_pipeline_values(cfg.data, source)).validate()
    except PipelineConfigError as exc:   # its message starts with the key under data.pipeline
        raise ConfigError(f"{source}: {_full_pipeline_keys(str(exc))}") from exc
    patch = _model_patch_size(cfg)
    _require(isinstance(patch, int) and not isinstance(patch, bool) and patch > 0, source,
             f"model.patch_size must be an integer > 0, got {patch!r}")
    # The masks are drawn on the model's patch grid, and every crop must tile into patches.
    _require(pipeline.masks.patch_size == patch, source,
             f"data.pipeline.masks.patch_size ({pipeline.masks.patch_size}) must equal "
             f"model.patch_size ({patch})")
    _require(pipeline.views.n_local == 0 or pipeline.views.local_size % patch == 0, source,
             f"data.pipeline.views.local_size ({pipeline.views.local_size}) must be a multiple "
             f"of model.patch_size ({patch})")
    return pipeline


def _full_pipeline_keys(message: str) -> str:
    """A PipelineConfig message with its keys as a training config spells them: the leading
    key and every section key after it (`views.global_size` -> `data.pipeline.views...`), so
    the override that set any of them is the one blamed."""
    message = re.sub(r"(?<![\w.])(sampling|views|masks)\.(?=\w)", r"data.pipeline.\1.", message)
    return message if message.startswith("data.pipeline.") else f"data.pipeline.{message}"


def save_config(cfg: DictConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config atomically (temporary file, then rename)."""
    text = OmegaConf.to_yaml(cfg, resolve=True)
    return write_text_atomically(path, text)
