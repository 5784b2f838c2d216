"""The study's settings as typed, frozen dataclasses: built once per job, read by attribute.

A job gets its settings as JSON (``python -m trace <stage> --cfg ...``, built by the Snakefile from the
validated study). ``<Settings class>.from_mapping`` turns that JSON into one tree of frozen dataclasses:

- every field's meaning, type and **default** come from ONE place, ``workflow/schemas/config.schema.yaml``
  (the node each class names in ``SCHEMA``); a key the study leaves out gets the schema's ``default``;
- every value is checked against its schema node, and an unknown or missing key is refused, in one line
  naming the key (``train.kl.alpha: 1.5 is greater than the maximum of 1``);
- nested sections are nested settings (``run.kl.alpha``, ``run.rollout.engine``), never raw dicts.

Tests and scripts build a variant with :func:`replace` (``replace(run, kl={"alpha": 0.5})``) or by
``from_mapping`` over a merged mapping. Self-contained (stdlib + yaml + jsonschema), like study_config.py.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Mapping

import yaml

SCHEMA_FILE = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"


class SettingsError(ValueError):
    """A settings problem, as one line naming the key."""


@functools.lru_cache(maxsize=1)
def schema() -> dict:
    return yaml.safe_load(SCHEMA_FILE.read_text())


def _node(pointer: str) -> dict:
    """The schema node at a JSON pointer ('#/properties/train'), with $ref followed."""
    node: Any = schema()
    for part in pointer.removeprefix("#/").split("/"):
        node = node[part]
    return _deref(node)


def _deref(node: dict) -> dict:
    while isinstance(node, Mapping) and "$ref" in node:
        rest = {k: v for k, v in node.items() if k != "$ref"}
        node = {**_node(node["$ref"]), **rest}
    return node


def schema_default(pointer: str) -> Any:
    """The ``default`` of one schema node (for a job whose settings are keyword arguments, not a class)."""
    return copy.deepcopy(_node(pointer)["default"])


def _properties(pointers: tuple[str, ...]) -> dict[str, dict]:
    """The properties of one or several schema nodes (a job's settings may join a section and extras)."""
    merged: dict[str, dict] = {}
    for pointer in pointers:
        node = _node(pointer)
        for part in [node, *node.get("allOf", [])]:
            merged.update(_deref(part).get("properties", {}))
    return merged


def _check(value: Any, node: dict, where: str) -> None:
    import jsonschema

    validator = jsonschema.Draft202012Validator({**node, "$defs": schema()["$defs"]})
    error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if error is not None:
        alternatives = _unmet_alternatives(error)
        if alternatives is not None:  # e.g. a frozen annotator: a model folder, or a prompted served model
            at = "".join(f".{p}" if isinstance(p, str) else f"[{p}]" for p in alternatives.absolute_path)
            forms = [" + ".join(f"{where}{at}.{key}" for key in form.get("required", [])) for form in alternatives.validator_value]
            raise SettingsError(f"{where}{at}: set {', or '.join(form for form in forms if form)}")
        at = "".join(f".{p}" if isinstance(p, str) else f"[{p}]" for p in error.absolute_path)
        if error.validator == "additionalProperties" and isinstance(error.instance, Mapping):
            known = sorted(error.schema.get("properties", {}))
            unknown = sorted(set(error.instance) - set(known))
            raise SettingsError(f"{where}{at}: unknown key(s) {unknown}; known: {known}")
        raise SettingsError(f"{where}{at}: {error.message}")


def _unmet_alternatives(error):
    """The innermost ``anyOf`` of required-key forms that the value fits none of (None if the error is another)."""
    while error is not None:
        if error.validator == "anyOf" and all(isinstance(f, Mapping) and f.get("required") for f in error.validator_value):
            return error
        error = error.parent
    return None


def _settings_type(hint: Any) -> type | None:
    """The Settings class in ``X``, ``X | None`` (None otherwise)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    found = [o for o in options if isinstance(o, type) and issubclass(o, Settings)]
    return found[0] if found else None


@dataclasses.dataclass(frozen=True)
class Settings:
    """Base of every settings class: ``SCHEMA`` = the schema node(s) its fields are the properties of."""

    SCHEMA: ClassVar[tuple[str, ...]] = ()
    WHERE: ClassVar[str] = ""   # how the study calls this section, for error lines (train.kl)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None, where: str | None = None):
        where = where or cls.WHERE or cls.__name__
        values = {} if values is None else values
        if isinstance(values, cls):
            return values
        if not isinstance(values, Mapping):
            raise SettingsError(f"{where}: expected a mapping of keys, got {type(values).__name__}")
        if len(cls.SCHEMA) == 1:  # the whole section against its node (closed keys, required forms)
            _check(values, _node(cls.SCHEMA[0]), where)
        properties = _properties(cls.SCHEMA)
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise SettingsError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
        built = {}
        for name in names:
            node = _deref(properties.get(name, {}))  # a property may be a $ref to a shared node (its default too)
            if name in values:
                value = values[name]
                _check(value, node, f"{where}.{name}")
            elif "default" in node:
                value = copy.deepcopy(node["default"])
            elif _settings_type(hints[name]) is not None and not _node_requires(node):
                value = {}  # a section left out: its own defaults
            else:
                raise SettingsError(f"{where}: missing key {name!r}")
            built[name] = _convert(hints[name], value, f"{where}.{name}")
        return cls(**built)

    @classmethod
    def from_json(cls, text: str, where: str | None = None):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SettingsError(f"{where or cls.WHERE or cls.__name__}: not valid JSON ({exc})") from None
        return cls.from_mapping(values, where)

    def to_dict(self) -> dict:
        """Plain JSON-able values (tuples as lists), e.g. for a run's fingerprint or a job's --cfg."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=_plain))


def _node_requires(node: dict) -> bool:
    return bool(_deref(node).get("required"))


def _plain(value):
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"not JSON-able: {type(value).__name__}")


def _convert(hint: Any, value: Any, where: str) -> Any:
    kind = _settings_type(hint)
    if kind is not None:
        if value is None:  # null: off where the field may be None, else the section's own defaults
            return None if type(None) in typing.get_args(hint) else kind.from_mapping({}, where)
        return kind.from_mapping(value, where)
    origin = typing.get_origin(hint)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if isinstance(value, Mapping):
        return copy.deepcopy(dict(value))  # free-form (http extras, benchmark names)
    return value


def replace(settings: Settings, **changes):
    """A copy with some fields changed; a nested section may be given as a mapping of its changed keys
    (``replace(run, kl={"alpha": 0.5}, steps=2)``)."""
    updates = {}
    for name, change in changes.items():
        current = getattr(settings, name)
        if isinstance(current, Settings) and isinstance(change, Mapping):
            change = replace(current, **change)
        elif isinstance(change, Mapping) and current is None:
            kind = _settings_type(typing.get_type_hints(type(settings))[name])
            change = kind.from_mapping(change, f"{type(settings).__name__}.{name}") if kind else change
        updates[name] = change
    return dataclasses.replace(settings, **updates)


# ---------------------------------------------------------------------------------------------- train
@dataclasses.dataclass(frozen=True)
class Sampling(Settings):
    SCHEMA: ClassVar = ("#/$defs/sampling",)
    WHERE: ClassVar = "train.sampling"
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int

    def as_dict(self) -> dict:
        """The engines' sampling mapping."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class SamplingOverrides(Settings):
    """Any subset of train.sampling (None = as in training)."""
    SCHEMA: ClassVar = ("#/properties/train/properties/validation/properties/sampling",)
    WHERE: ClassVar = "train.validation.sampling"
    temperature: float | None
    top_p: float | None
    top_k: int | None
    max_new_tokens: int | None

    def over(self, base: Sampling) -> Sampling:
        return dataclasses.replace(base, **{k: v for k, v in dataclasses.asdict(self).items() if v is not None})


@dataclasses.dataclass(frozen=True)
class KL(Settings):
    SCHEMA: ClassVar = ("#/properties/train/properties/kl",)
    WHERE: ClassVar = "train.kl"
    w0: float
    warmup: int
    end: int
    alpha: float
    entry_clip: float | None
    top_k: int | None
    tail_bucket: bool
    teacher_sync_every: int
    ema_rate: float
    jsd_beta: float
    sdpo_distillation_weight: float
    srpo_entropy_beta: float
    rlsd_eps_w: float
    full_grpo_on_spans_without_kl: bool


@dataclasses.dataclass(frozen=True)
class TrOPD(Settings):
    """TrOPD's pieces, each switchable for an ablation (methods tropd, tropd_noguide; config.yaml train.tropd)."""
    SCHEMA: ClassVar = ("#/properties/train/properties/tropd",)
    WHERE: ClassVar = "train.tropd"
    agreement_threshold: float   # trust region: q(y_t) ≥ this (trace.router.agreement_region)
    trust_region: bool           # false: K1 on every token, no outliers (the ablation "no trust region")
    outlier_fkl: bool            # the forward KL on the teacher's top-k at outliers
    outlier_top_k: int
    outlier_weight: float
    imitation_weight: float      # β of the NLL on teacher-written (guided) tokens


@dataclasses.dataclass(frozen=True)
class Guidance(Settings):
    """Teacher-prefix rollouts (rollout policy teacher_prefix, trace/rollout/behaviour.py)."""
    SCHEMA: ClassVar = ("#/properties/train/properties/guidance",)
    WHERE: ClassVar = "train.guidance"
    share: float
    prefix_tokens: int


@dataclasses.dataclass(frozen=True)
class TRB(Settings):
    """TRB's trust-region behaviour policy (rollout policy trb, trace/rollout/behaviour.py)."""
    SCHEMA: ClassVar = ("#/properties/train/properties/trb",)
    WHERE: ClassVar = "train.trb"
    kl_budget: float
    warmup: int
    end: int
    is_clip: float


@dataclasses.dataclass(frozen=True)
class Validation(Settings):
    SCHEMA: ClassVar = ("#/properties/train/properties/validation",)
    WHERE: ClassVar = "train.validation"
    every: int
    n_problems: int | None
    k: int
    sampling: SamplingOverrides
    select: str


@dataclasses.dataclass(frozen=True)
class Probe(Settings):
    SCHEMA: ClassVar = ("#/properties/train/properties/probe",)
    WHERE: ClassVar = "train.probe"
    steps: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class AnnotatorServer(Settings):
    SCHEMA: ClassVar = ("#/properties/train/properties/rollout/properties/annotator_server",)
    WHERE: ClassVar = "train.rollout.annotator_server"
    dtype: str | None
    max_model_len: int | None
    gpu_memory_utilization: float
    enforce_eager: bool
    kv_cache_gib: float
    startup_timeout_s: float
    extra_args: tuple[str, ...]
    log: str | None


@dataclasses.dataclass(frozen=True)
class Rollout(Settings):
    SCHEMA: ClassVar = ("#/properties/train/properties/rollout",)
    WHERE: ClassVar = "train.rollout"
    engine: str
    dtype: str | None
    max_model_len: int | None
    enforce_eager: bool
    gpu_memory_utilization: float
    sleep_mode: bool
    sleep_level: int
    kv_cache_gib: float
    annotator_server: AnnotatorServer | None


@dataclasses.dataclass(frozen=True)
class Parallel(Settings):
    SCHEMA: ClassVar = ("#/properties/train/properties/parallel",)
    WHERE: ClassVar = "train.parallel"
    nodes: int
    procs_per_node: int
    cpus_per_proc: int
    mem_mb_per_node: int | None
    runtime_min: int
    rdzv_port: int

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node


@dataclasses.dataclass(frozen=True)
class Likelihood(Settings):
    SCHEMA: ClassVar = ("#/$defs/annotator_fields/properties/likelihood",)
    WHERE: ClassVar = "annotator.likelihood"
    context: str
    error_threshold: float
    key_threshold: float


@dataclasses.dataclass(frozen=True)
class Prompted(Settings):
    SCHEMA: ClassVar = ("#/$defs/annotator_fields/properties/prompted",)
    WHERE: ClassVar = "annotator.prompted"
    max_new_tokens: int
    do_sample: bool
    thinking: bool | None   # None: the run's `thinking`


@dataclasses.dataclass(frozen=True)
class Annotator(Settings):
    SCHEMA: ClassVar = ("#/$defs/annotator_fields",)
    WHERE: ClassVar = "annotator"
    tier: str
    mode: str
    model: str | None
    http: Mapping[str, Any] | None   # trace/annotate/http.py HttpAnnotatorConfig.from_mapping reads it
    cache_dir: str | None
    batch_size: int
    max_segment_chars: int | None
    likelihood: Likelihood
    prompted: Prompted


@dataclasses.dataclass(frozen=True)
class TrainRun(Settings):
    """One RL run: ``train`` (without ``parallel``, which only shapes the launch) + the run's identity."""
    SCHEMA: ClassVar = ("#/properties/train", "#/$defs/run")
    WHERE: ClassVar = "train"
    steps: int
    batch_prompts: int
    group_size: int
    micro_batch_size: int
    micro_batch_tokens: int | None
    activation_checkpointing: bool
    rollout_rng: str
    rollout: Rollout
    lr: float
    adam_betas: tuple[float, float]
    weight_decay: float
    grad_clip: float
    eps_low: float
    eps_high: float
    dual_clip_c: float | None
    agg_mode: str
    advantage: str
    save_every: int
    logprob_chunk: int
    device: str
    dtype: str
    sampling: Sampling
    kl: KL
    annotator: Annotator
    teacher_model: str | None   # the external teacher's folder (methods with teacher "external": OPD)
    tropd: TrOPD
    guidance: Guidance
    trb: TRB
    validation: Validation
    probe: Probe
    # the run's identity (the train rule adds these to the train section)
    method: str
    seed: int
    thinking: bool
    teacher_check_on_worse: str
    train_source: str | None

    @property
    def rollout_dtype(self) -> str:
        return self.rollout.dtype or self.dtype


# ---------------------------------------------------------------------------------------------- other jobs
@dataclasses.dataclass(frozen=True)
class TeacherCheck(Settings):
    SCHEMA: ClassVar = ("#/$defs/teacher_check",)
    WHERE: ClassVar = "teacher_check"
    n_prompts: int
    seed: int
    on_worse: str
    engine: str | None


@dataclasses.dataclass(frozen=True)
class TeacherGapJob(Settings):
    """The teacher check of one base model and teacher context (rule teacher_gap)."""
    SCHEMA: ClassVar = ("#/$defs/teacher_gap_job",)
    WHERE: ClassVar = "teacher-gap"
    train: TrainRun
    teacher_check: TeacherCheck
    context: str
    model: str | None


@dataclasses.dataclass(frozen=True)
class ToyWorld(Settings):
    SCHEMA: ClassVar = ("#/properties/toy",)
    WHERE: ClassVar = "toy"
    seed: int
    n_train: int
    n_sft_choice: int
    sft_slip_rate: float
    n_val: int
    n_test: int
    tokenizer_vocab: int
    sft_privileged_share: float


@dataclasses.dataclass(frozen=True)
class ToySize(Settings):
    SCHEMA: ClassVar = ("#/$defs/toy_model/properties/size",)
    WHERE: ClassVar = "models.<name>.size"
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None
    max_positions: int


@dataclasses.dataclass(frozen=True)
class Sft(Settings):
    SCHEMA: ClassVar = ("#/$defs/sft",)
    WHERE: ClassVar = "models.<name>.sft"
    steps: int
    batch_size: int
    lr: float
    warmup: int
    weight_decay: float


@dataclasses.dataclass(frozen=True)
class ToyBaseJob(Settings):
    """One toy base policy (rule toy_base): its size and SFT, the toy seed, thinking, the tokenizer size."""
    SCHEMA: ClassVar = ("#/$defs/toy_model", "#/$defs/toy_base_job")
    WHERE: ClassVar = "toy-base"
    size: ToySize
    sft: Sft
    seed: int
    thinking: bool
    tokenizer_vocab: int


@dataclasses.dataclass(frozen=True)
class ModelInit(Settings):
    """A random-init base (CPU smoke only): a real config, resized, then a short SFT."""
    SCHEMA: ClassVar = ("#/$defs/pretrained_model/properties/init",)
    WHERE: ClassVar = "models.<name>.init"
    config: str
    tokenizer: str
    size: Mapping[str, int]
    seed: int
    sft: Sft


@dataclasses.dataclass(frozen=True)
class PretrainedModel(Settings):
    """A base policy or frozen annotator of the paper study: a hub repo at a revision, a local folder, or
    a random init (exactly one way, checked by the schema)."""
    SCHEMA: ClassVar = ("#/$defs/pretrained_model",)
    WHERE: ClassVar = "models.<name>"
    paper_model: str | None
    repo: str | None
    revision: str | None
    path: str | None
    sha256: Mapping[str, str] | None
    init: ModelInit | None


@dataclasses.dataclass(frozen=True)
class BaseModelJob(Settings):
    SCHEMA: ClassVar = ("#/$defs/base_model_job",)
    WHERE: ClassVar = "base-model"
    name: str
    entry: PretrainedModel
    thinking: bool
    section: str


@dataclasses.dataclass(frozen=True)
class BenchmarkDataJob(Settings):
    SCHEMA: ClassVar = ("#/$defs/benchmark_data_job",)
    WHERE: ClassVar = "prepare-benchmarks"
    mirror_dir: str | None
    names: tuple[str, ...]
    gpqa_seed: int


@dataclasses.dataclass(frozen=True)
class TrainDataJob(Settings):
    SCHEMA: ClassVar = ("#/$defs/train_data_job",)
    WHERE: ClassVar = "prepare-train"
    mirror_dir: str | None
    max_rows: int
    val_rows: int
    seed: int
    source: str


@dataclasses.dataclass(frozen=True)
class TierAblation(Settings):
    """Table 3: ``method`` once per annotator tier on ``model`` (tiers: overrides of train.annotator)."""
    SCHEMA: ClassVar = ("#/$defs/ablations/properties/annotator_tiers",)
    WHERE: ClassVar = "ablations.annotator_tiers"
    model: str
    method: str
    tiers: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class MaskAblation(Settings):
    """Table 4: the same KL schedule on other token masks, on ``model``."""
    SCHEMA: ClassVar = ("#/$defs/ablations/properties/mask_localisation",)
    WHERE: ClassVar = "ablations.mask_localisation"
    model: str
    methods: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class OpdFamily(Settings):
    """Beyond the paper: GRPO, OPD-type methods from an external ``teacher`` and TRACE on one student ``model``,
    every method × ``seeds`` on the same data, steps and evaluation (rule opd_family, trace/opd_family.py)."""
    SCHEMA: ClassVar = ("#/$defs/opd_family",)
    WHERE: ClassVar = "ablations.opd_family"
    model: str
    teacher: str
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    early_steps: int


@dataclasses.dataclass(frozen=True)
class Ablations(Settings):
    SCHEMA: ClassVar = ("#/$defs/ablations",)
    WHERE: ClassVar = "ablations"
    annotator_tiers: TierAblation | None
    mask_localisation: MaskAblation | None
    opd_family: OpdFamily | None


@dataclasses.dataclass(frozen=True)
class ReportJob(Settings):
    """What the aggregate, the report and a results cache need (rules aggregate / report / export_cache)."""
    SCHEMA: ClassVar = ("#/$defs/report_job",)
    WHERE: ClassVar = "report settings"
    benchmarks: Mapping[str, str]
    methods: tuple[str, ...] | None
    ablations: Ablations
    compare_to_paper: bool
    paper_models: Mapping[str, str]
    calibration_bins: int


@dataclasses.dataclass(frozen=True)
class FamilyJob(Settings):
    """What the opd_family table and figure need (rule opd_family)."""
    SCHEMA: ClassVar = ("#/$defs/family_job",)
    WHERE: ClassVar = "opd_family settings"
    benchmarks: Mapping[str, str]
    family: OpdFamily
    calibration_bins: int


# ---------------------------------------------------------------------------------------------- the default study
DEFAULT_STUDY_FILE = Path(__file__).resolve().parent.parent / "config.yaml"


def default_train_section() -> dict:
    """config.yaml's ``train`` without ``parallel`` (the launch shape): the base every test, script and the
    bench build their run settings from (``TrainRun.from_mapping({**default_train_section(), ...})``)."""
    train = yaml.safe_load(DEFAULT_STUDY_FILE.read_text())["train"]
    return {key: value for key, value in train.items() if key != "parallel"}


def default_run(method: str = "grpo", **changes) -> TrainRun:
    """The default study's settings for one run of ``method``, with ``changes`` (see :func:`replace`)."""
    return replace(TrainRun.from_mapping({**default_train_section(), "method": method}), **changes)
