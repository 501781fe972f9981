"""Pydantic v2 models of an experiment spec (DESIGN.md "Specs"; conventions.md §3).

No I/O here: `sferd.spec.loader` reads YAML with positions, these models validate, `sferd.spec.checks`
runs the rules that need several fields or derived facts. Every model forbids unknown keys (a typo is an
error with a line number) and is frozen. Units live in field names; every non-obvious default cites its
source. Nothing here imports torch: `sferd-spec validate` must stay fast.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationInfo, field_validator, model_validator

from sferd.spec.limits import CONTROL, echo, one_of

# Names become parts of DVC stage names, file names and commands, so they are matched whole (`fullmatch`: a `$`
# would also accept a trailing newline) and bounded, so that a stage name built from several stays a valid file name.
NAME_RE = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
NAME_MAX = 40
# Segments the compiler appends to method and scale names (`-s0004`, `-seed0001`): a name holding one could
# produce another stage's name.
RESERVED_SEGMENT = re.compile(r"s[0-9]+|seed[0-9]+")
# Stage-name stems a method name would collide with (`<dataset>-teacher-s0008-fid` is the teacher's FID stage).
RESERVED_METHOD_NAMES = frozenset({"data", "features", "teacher", "reference-stats", "heldout", "noise"})
# Where a pipeline may live: the root (the quickstart) or its own folder under stages/ (DESIGN.md "Layout"); the value
# reaches every stage command and the paths compile writes, so nothing else is accepted.
PIPELINE_RE = re.compile(r"\.|stages/[a-z0-9]+(?:-[a-z0-9]+)*")
# `extends`: a relative path of plain file-name characters (no NUL, no newline, nothing a shell or YAML would read).
EXTENDS_RE = re.compile(r"(?:(?:\.\.|[A-Za-z0-9_][A-Za-z0-9_.-]*)/)*[A-Za-z0-9_][A-Za-z0-9_.-]*\.ya?ml")
# A versioned weights file committed to the repo (`features.weights.path`): repo-relative, plain file-name
# characters, every segment starting with a letter, digit or `_` (so no `..`, no `.`, no absolute path), ending `.pt`.
ASSET_PATH_RE = re.compile(r"(?:[A-Za-z0-9_][A-Za-z0-9_.-]*/)*[A-Za-z0-9_][A-Za-z0-9_.-]*\.pt")
# A local weights file that becomes a DVC dependency (`classifier.path` of a pretrained classifier): repo-relative or
# absolute, plain file-name characters, every segment starting with a letter, digit or `_` (no `..`, no `.`, no `~`,
# no URL, no `${`, which DVC would read as a variable), ending .pt or .pth.
LOCAL_WEIGHTS_RE = re.compile(r"/?(?:[A-Za-z0-9_][A-Za-z0-9_.-]*/)*[A-Za-z0-9_][A-Za-z0-9_.-]*\.pth?")
# Folders whose files are stage outputs or scratch state: a dependency there would add an edge no stage declares.
GENERATED_ROOTS = ("results/", ".sferd/", "stages/", ".dvc/")
# A weights version: becomes part of a file name (`<dataset-id>-digits-cnn-<version>.pt`) and of every FID metrics file.
WEIGHTS_VERSION_RE = re.compile(r"[a-z0-9][a-z0-9.-]*")
WEIGHTS_VERSION_MAX = 40
# A scale profile's `set:` key: dotted fields, canonical list indices (no `00`, no non-ASCII digits: two spellings
# of one path would let YAML order decide which value wins) or `*`.
SET_PATH_RE = re.compile(r"(?:[a-z_][a-z0-9_]*|\*|0|[1-9][0-9]{0,5})(?:\.(?:[a-z_][a-z0-9_]*|\*|0|[1-9][0-9]{0,5}))*")

# Bounds of numbers with a meaning, far beyond any published configuration (PD's longest run: 800k teacher updates,
# 8192 start steps, batch 2048 on ImageNet 64) and low enough that every derived quantity stays exact and finite.
MAX_UPDATES = 10**8
MAX_BATCH = 65_536
MAX_STEPS = 65_536
MAX_CHANNELS = 8_192
MAX_SAMPLES = 10**7
# Seeds: per-sample generators are seeded with 16·seed + stream (sferd.diffusion.sampler) and training generators
# with seed + 100·steps + small offsets; torch.Generator.manual_seed accepts at most 2**64 − 1 and the samples file
# stores seeds as int64, so every seed (and sample_seed_start + num_samples) stays below 2**59.
SEED_LIMIT = 2**59
MAX_LIST = 32  # step counts, seeds, methods: a spec that lists more is a mistake (and a pipeline of thousands)


# Error type of a discriminated union whose tag is chosen by a function (the teacher's `kind`, the classifier's
# `architecture`) when the value is none of the choices. Pydantic's own error would name the function
# (`_teacher_kind()`) and list the union's internal tags, not what a spec may write; this one names the field (the
# loader points at its value) and every value it accepts.
UNKNOWN_CHOICE = "unknown_choice"


def _choice_error(field: str, choices: list[str]) -> dict:
    """Discriminator(...) arguments for UNKNOWN_CHOICE: `field` must be one of `choices` (worded like Pydantic's
    literal errors)."""
    # the message is a format template: braces in it would be read as placeholders
    return {"custom_error_type": UNKNOWN_CHOICE, "custom_error_message": f"Input should be {one_of(choices)}",
            "custom_error_context": {"discriminator": f"'{field}'"}}


class Model(BaseModel):
    # strict: no silent coercion (`true` is not the seed 1, "2000" is not an int, 'yes' is not a bool);
    # allow_inf_nan=False: every float is finite.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def _check_name(v: str, limit: int = NAME_MAX) -> str:
    if len(v) > limit or not NAME_RE.fullmatch(v):
        raise ValueError(f"{echo(v)} must match [a-z0-9]+(-[a-z0-9]+)*, at most {limit} characters (it becomes "
                         "part of DVC stage names)")
    return v


def _check_stem(v: str) -> str:
    """A name the compiler extends with step and seed tags (methods, scale profiles)."""
    _check_name(v)
    reserved = [seg for seg in v.split("-") if RESERVED_SEGMENT.fullmatch(seg)]
    if reserved:
        raise ValueError(f"segment {reserved[0]!r} looks like a step or seed tag (s0004, seed0001), which the compiler "
                         "appends to stage names: choose another name")
    return v


# Free text a spec puts into the rendered Markdown (row labels, the table's title, a reported row's system, source
# and reason) is one line: a line break would end the Markdown table row, or the `# title` heading, mid-text. The
# loader refuses other control characters everywhere; a tab is refused here too (it is no table text either), so
# every character of limits.CONTROL is, the same set the renderer turns into spaces. A line break, for the message,
# is what ends a Markdown line (CommonMark: LF, CR) plus the Unicode ones (NEL, LS, PS) an editor may show as one;
# VT and FF are named as control characters. Markdown is allowed: the renderer escapes only what would break the
# table, a link or the page (sferd.report.markdown).


def _one_line(v: str) -> str:
    m = CONTROL.search(v)
    if m is not None:
        what = "a tab" if m.group() == "\t" else "a line break" if m.group() in "\n\r\x85\u2028\u2029" else \
            f"the control character {m.group()!r}"
        raise ValueError(f"{echo(v)} holds {what}: text shown in a rendered table is one line (a line break would "
                         "end the Markdown table row or heading); write it on one line (a folded `>-` block joins "
                         "lines with spaces)")
    return v


TableText = Annotated[str, AfterValidator(_one_line)]


# --------------------------------------------------------------------------------------------------- data

DatasetId = Literal["digits-8x8", "digits-16x16", "digits-32x32", "cifar10-32x32", "imagenet-64x64"]

# id → (short name used in stage names, channels, resolution, classes)
DATASETS: dict[str, tuple[str, int, int, int]] = {
    "digits-8x8": ("digits", 1, 8, 10),
    "digits-16x16": ("digits", 1, 16, 10),
    "digits-32x32": ("digits", 1, 32, 10),
    "cifar10-32x32": ("cifar10", 3, 32, 10),
    "imagenet-64x64": ("imagenet64", 3, 64, 1000),
}


class DataSourceSpec(Model):
    """Where a downloaded dataset lives (CIFAR-10, ImageNet 64×64); digits need none (embedded)."""

    data_dir: str = Field(
        min_length=1, max_length=1024,
        description="Folder with the dataset files: CIFAR-10's `cifar-10-batches-py/` lives inside it; for "
        "ImageNet 64×64 it holds `train_data_batch_1..10.npz` and `val_data.npz`. Relative to the repo root."
    )
    download: bool = Field(False, description="CIFAR-10 only: let torchvision download it (a connected machine).")
    verify_checksums: bool = Field(True, description="CIFAR-10 only: check torchvision's md5 sums of the batches.")


class DatasetSpec(Model):
    id: DatasetId = Field(
        description="Dataset and resolution. `digits-*` is scikit-learn's load_digits (8×8 native, "
        "upsampled bilinearly for 16/32), embedded and offline."
    )
    heldout_fraction: float = Field(
        0.2,
        gt=0.0,
        lt=0.5,
        description="Fraction of images kept out of training (stratified); FID of held-out vs training "
        "images is the table's floor row.",
    )
    split_seed: int = Field(0, ge=0, lt=SEED_LIMIT, description="Seed of the train/held-out split.")
    random_flip: bool = Field(
        False,
        description="Random horizontal flips in training (PD on CIFAR-10/ImageNet: on; digits: off, a "
        "mirrored digit is another glyph).",
    )
    source: DataSourceSpec | None = Field(
        None,
        description="Where CIFAR-10 / ImageNet 64×64 files are (required for them; digits: null). Only the data "
        "stage reads it; the held-out split of these datasets is their official test / validation set.",
    )

    @property
    def short(self) -> str:
        return DATASETS[self.id][0]

    @property
    def channels(self) -> int:
        return DATASETS[self.id][1]

    @property
    def resolution(self) -> int:
        return DATASETS[self.id][2]

    @property
    def num_classes(self) -> int:
        return DATASETS[self.id][3]


# ------------------------------------------------------------------------------------------------ networks


class UNetSpec(Model):
    base_channels: int = Field(gt=0, le=MAX_CHANNELS, description="Channels at the first level (PD CIFAR-10: 256).")
    channel_mult: list[Annotated[int, Field(ge=1, le=64)]] = Field(
        min_length=1, max_length=8, description="Channel multiplier per resolution level (PD CIFAR-10: [1, 1, 1])."
    )
    num_res_blocks: int = Field(
        ge=1, le=32, description="Encoder res-blocks per level; the decoder has one more (PD CIFAR-10: 3)."
    )
    attention_resolutions: list[Annotated[int, Field(ge=1, le=4096)]] = Field(
        max_length=8, description="Feature-map sizes that get self-attention (PD CIFAR-10: [16, 8])."
    )
    num_heads: int = Field(1, ge=1, le=1024, description="Attention heads when head_channels is null (PD CIFAR-10: 1).")
    head_channels: int | None = Field(
        None, ge=1, le=MAX_CHANNELS, description="Channels per head; overrides num_heads (PD ImageNet 64: 64)."
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Teacher dropout (PD CIFAR-10: 0.2). Students use 0.")
    norm_groups: int = Field(32, ge=1, le=MAX_CHANNELS, description="GroupNorm groups (32 in PD; smaller for tiny models).")
    class_conditional: bool = Field(
        False, description="Add a class embedding to the time embedding (D6: ImageNet 64×64 is conditional)."
    )

    @field_validator("channel_mult")
    @classmethod
    def _positive_mults(cls, v: list[int]) -> list[int]:
        if any(m < 1 for m in v):
            raise ValueError("every channel multiplier must be >= 1")
        return v

    @model_validator(mode="after")
    def _groups_divide(self) -> "UNetSpec":
        for m in self.channel_mult:
            if (self.base_channels * m) % self.norm_groups:
                raise ValueError(
                    f"norm_groups={self.norm_groups} must divide every level's channels "
                    f"(base_channels {self.base_channels} × {m})"
                )
        return self

    def resolutions(self, image_resolution: int) -> list[int]:
        return [image_resolution // 2**k for k in range(len(self.channel_mult))]


Parameterization = Literal["x", "eps", "v", "both"]
LossWeighting = Literal["truncated_snr", "snr_plus_one"]
# sferd.methods.sferd.SHIFT_PARAMETERIZATIONS, same order (a test keeps them equal; this package imports no torch).
ShiftParameterization = Literal["x0_tweedie", "x0_direct", "v_direct"]


class _TeacherFields(Model):
    model: UNetSpec = Field(description="Teacher U-Net (PD unet_iddpm; sferd-method.md §12).")
    parameterization: Parameterization = Field(
        "x", description="Network output (PD Table 1: `x` on CIFAR-10, `both` on ImageNet 64×64)."
    )
    loss_weighting: LossWeighting = Field(
        "truncated_snr",
        description="max(SNR, 1)·x-MSE (`truncated_snr`, PD's choice) or (1+SNR)·x-MSE = v-MSE; the distillation "
        "chains use the same weighting.",
    )

    @field_validator("loss_weighting")
    @classmethod
    def _eps_diverges(cls, v: str, info: ValidationInfo) -> str:
        if v == "truncated_snr" and info.data.get("parameterization") == "eps":
            raise ValueError(
                "eps-prediction with truncated-SNR weighting diverges as SNR → 0 (PD Table 1); "
                "use parameterization x, v or both"
            )
        return v


class ExternalTeacherSpec(_TeacherFields):
    """A teacher trained elsewhere (e.g. by this suite's teacher stage on another machine): imported, not trained."""

    kind: Literal["external"] = Field(description="`external`: the teacher is a checkpoint file, checked by its hash.")
    path: str = Field(min_length=1, max_length=1024, description="Checkpoint file (repo-relative or absolute): a `model.pt` of this suite's teacher "
                      "stage, or a bare state_dict of the same U-Net.")
    sha256: str = Field(description="SHA-256 of the file (64 hex digits); a mismatch stops the import stage.")

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        if len(v) != 64 or any(c not in "0123456789abcdef" for c in v.lower()):
            raise ValueError("sha256 must be 64 hexadecimal digits (`sha256sum FILE` prints it)")
        return v.lower()


class TeacherSpec(_TeacherFields):
    kind: Literal["train"] = Field("train", description="`train`: the teacher is trained by a pipeline stage.")
    updates: int = Field(gt=0, le=MAX_UPDATES, description="Optimiser updates (PD does not report its teacher length).")
    batch_size: int = Field(gt=0, le=MAX_BATCH, description="Images per update (PD CIFAR-10: 128).")
    lr: float = Field(gt=0.0, le=1.0, description="Adam learning rate after warm-up (PD CIFAR-10: 2e-4).")
    warmup_updates: int = Field(0, ge=0, le=MAX_UPDATES, description="Linear warm-up length (PD: 1000).")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="Decoupled weight decay (PD CIFAR-10: 0.001).")
    ema_decay: float = Field(0.9999, ge=0.0, lt=1.0, description="EMA of weights; the EMA is distilled (PD: 0.9999).")
    grad_clip_norm: float = Field(1.0, gt=0.0, le=1e6, description="Global gradient-norm clip (PD: 1).")
    checkpoint_every_updates: int = Field(
        500, gt=0, le=MAX_UPDATES, description="Write the resumable training state this often (a killed stage resumes)."
    )


def _teacher_kind(v: Any) -> str | None:
    """`kind` may be left out for a trained teacher (the common case). Anything but a mapping goes to the trained
    teacher, whose error then says a mapping was expected; an unknown `kind` gives None (UNKNOWN_CHOICE's error)."""
    if isinstance(v, dict):
        kind = v.get("kind", "train")
        return kind if kind in ("train", "external") else None
    return getattr(v, "kind", "train")


Teacher = Annotated[
    Union[Annotated[TeacherSpec, Tag("train")], Annotated[ExternalTeacherSpec, Tag("external")]],
    Discriminator(_teacher_kind, **_choice_error("kind", ["train", "external"])),
]


def _check_sha256(v: str) -> str:
    if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
        raise ValueError("sha256 must be 64 lowercase hexadecimal digits (`sha256sum FILE` prints it)")
    return v


class FeatureWeightsSpec(Model):
    """A fixed, versioned weights file of the feature network, committed to git with its SHA-256 (like Inception's).

    Written by `sferd-spec features-train SPEC --version V`; the features stage verifies it and trains nothing, so
    FIDs measured on different machines use the same features and can be compared."""

    version: str = Field(
        max_length=WEIGHTS_VERSION_MAX,
        description="Weights version ([a-z0-9][a-z0-9.-]*, e.g. v1); named in every FID metrics file and table footer.",
    )
    path: str = Field(
        max_length=1024,
        description="Repo-relative path of the .pt file (assets/features/<dataset-id>-digits-cnn-<version>.pt); "
        "committed to git, not DVC.",
    )
    sha256: str = Field(description="SHA-256 of the file (64 lowercase hex digits); a mismatch stops the features stage.")

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        if not WEIGHTS_VERSION_RE.fullmatch(v):
            raise ValueError(f"{echo(v)} is not a weights version: use [a-z0-9][a-z0-9.-]* (e.g. v1, v2.1)")
        return v

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        # a validator, not Field(pattern=): Pydantic's patterns search rather than match the whole value
        if not ASSET_PATH_RE.fullmatch(v):
            raise ValueError(f"{echo(v)} is not a repo-relative path of a .pt file ([A-Za-z0-9_.-] and `/`, no `..`, "
                             "not absolute)")
        return v

    @field_validator("sha256")
    @classmethod
    def _sha(cls, v: str) -> str:
        return _check_sha256(v)


class FeatureNetSpec(Model):
    """The offline FID feature network: a small CNN classifier on the spec's training split (the quickstart's digits;
    CIFAR-10 when a paper spec runs at smoke scale, where no Inception weights exist). With `weights`, a fixed
    versioned file is verified and used; without, a stage trains the network on the machine that runs it."""

    kind: Literal["digits-cnn"] = Field(
        "digits-cnn", description="Small CNN classifier (10 classes; grey or RGB input) trained on the spec's data."
    )
    feature_dim: int = Field(64, ge=8, le=MAX_CHANNELS, description="Width of the pooled feature used by FID.")
    width: int = Field(32, ge=8, le=MAX_CHANNELS, description="Conv channels.")
    updates: int = Field(gt=0, le=MAX_UPDATES, description="Optimiser updates.")
    batch_size: int = Field(128, gt=0, le=MAX_BATCH, description="Images per update.")
    lr: float = Field(1e-3, gt=0.0, le=1.0, description="Adam learning rate.")
    weights: FeatureWeightsSpec | None = Field(
        None,
        description="The fixed, versioned weights file the features stage verifies and uses (no training). The "
        "settings above say how it was trained and are what `sferd-spec features-train` retrains with. null: the "
        "stage trains the network itself, and since CPU float results differ between machines so do the weights, "
        "so FIDs from two machines are not comparable.",
    )


# ------------------------------------------------------------------------------------------------ methods


class ChainFields(Model):
    """Fields shared by every progressive-distillation chain (PD and SFERD-PD)."""

    name: str = Field("pd", description="Row id in tables and stage names ([a-z0-9-]).")
    label: TableText = Field("PD", min_length=1, max_length=80, description="Row label in rendered tables (one line).")
    start_steps: int = Field(
        le=MAX_STEPS,
        description="Teacher DDIM steps at the chain start; a power of two (D12: 8192 CIFAR-10, 1024 ImageNet 64)."
    )
    start_from: str | None = Field(
        None,
        max_length=NAME_MAX,
        description="Name of an earlier method of this spec whose start_steps-step student is this chain's first "
        "teacher (null: the spec's teacher). Branches a few halvings off a shared chain, as the ablations do (§13).",
    )
    end_steps: int = Field(1, le=MAX_STEPS, description="Steps of the last student; a power of two below start_steps.")
    updates_per_halving: int = Field(gt=0, le=MAX_UPDATES, description="Optimiser updates per halving (PD configs: 50k).")
    updates_override: dict[int, Annotated[int, Field(le=MAX_UPDATES)]] = Field(
        default_factory=dict,
        max_length=MAX_LIST,
        description="Student step count → updates for that halving (PD text: 100k for the 2- and 1-step students).",
    )
    batch_size: int = Field(gt=0, le=MAX_BATCH, description="Images per update (PD CIFAR-10: 128).")
    lr: float = Field(gt=0.0, le=1.0, description="Adam learning rate, decayed linearly to 0 within each halving (PD: 5e-5).")
    grad_clip_norm: float = Field(1.0, gt=0.0, le=1e6, description="Global gradient-norm clip (PD: 1).")
    checkpoint_every_updates: int = Field(500, gt=0, le=MAX_UPDATES, description="Resumable state interval.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        _check_stem(v)
        if v in RESERVED_METHOD_NAMES:
            raise ValueError(f"{v!r} is the name of a fixed stage (<dataset>-{v}): choose another method name")
        return v

    @field_validator("start_steps", "end_steps")
    @classmethod
    def _pow2(cls, v: int) -> int:
        if not _is_power_of_two(v):
            raise ValueError(f"{v} is not a power of two (each halving halves the step count)")
        return v

    @field_validator("end_steps")
    @classmethod
    def _below_start(cls, v: int, info: ValidationInfo) -> int:
        start = info.data.get("start_steps")
        if start is not None and v >= start:
            raise ValueError(f"end_steps ({v}) must be below start_steps ({start})")
        return v

    @field_validator("updates_override")
    @classmethod
    def _override(cls, v: dict[int, int], info: ValidationInfo) -> dict[int, int]:
        chain = set(self_chain(info.data.get("start_steps"), info.data.get("end_steps", 1)))
        for steps, updates in v.items():
            if steps not in chain:
                raise ValueError(f"no halving produces a {steps}-step student (chain: {sorted(chain, reverse=True)})")
            if updates <= 0:
                raise ValueError(f"updates for the {steps}-step student must be > 0")
        return v

    def student_steps(self) -> list[int]:
        """Step counts of the students, in training order (start/2, start/4, …, end)."""
        return self_chain(self.start_steps, self.end_steps)

    def updates_for(self, steps: int) -> int:
        return self.updates_override.get(steps, self.updates_per_halving)

    def chain_params(self) -> dict:
        """What determines the chain's checkpoints (two methods with equal chain params share stages)."""
        return self.model_dump(mode="json", include={"start_steps", "start_from", "end_steps", "updates_per_halving",
                                                     "updates_override", "batch_size", "lr", "grad_clip_norm",
                                                     "checkpoint_every_updates"})


class PDMethod(ChainFields):
    """Progressive distillation (Salimans & Ho, ICLR 2022): halve the sampler's steps, one stage each."""

    kind: Literal["pd"] = Field(description="Method discriminator.")

    @property
    def guidance(self) -> None:
        return None

    @property
    def predictor(self) -> None:
        return None


class AttentionBlockRef(Model):
    """Which self-attention block's map drives guidance (D9: by resolution and position, not a raw index)."""

    part: Literal["encoder", "middle", "decoder"] = Field("decoder", description="U-Net part (D9: decoder).")
    resolution: int = Field(gt=0, le=4096, description="Feature-map size of the block (D9: 16 on CIFAR-10, 32 on ImageNet 64).")
    position: Union[Literal["first", "last"], Annotated[int, Field(ge=0, le=1024)]] = Field(
        "last", description="Among that part's attention blocks at that resolution, in execution order (D9: CIFAR-10 last, ImageNet 64 first)."
    )


class GuidanceSpec(Model):
    """SFERD's attention guidance of the teacher (sferd-method.md §6). Defaults: the paper's best values."""

    attention_block: AttentionBlockRef = Field(description="Block whose received attention defines the mask.")
    threshold: float = Field(1.0, gt=0.0, le=100.0, description="ψ: mask tokens with received attention > ψ (paper: best 1.0 of 0.8–1.2).")
    strength: float = Field(0.3, ge=0.0, le=100.0, description="w: ε_g = ε̂ + w(ε̂ − ε̃) (D1; paper: best 0.3 of 0–0.5).")
    blur_sigma: float = Field(3.0, gt=0.0, le=1000.0, description="Gaussian blur σ of the masked degradation (paper: best 3 of 1, 3, 5).")
    blur_kernel_size: int = Field(15, ge=1, le=1023, description="Blur kernel size, odd (D10: 15).")

    @field_validator("blur_kernel_size")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"blur kernel size must be odd, got {v}")
        return v


class PredictorSpec(Model):
    """Semantic encoder + gradient predictor trained on a frozen student (sferd-method.md §7, D5, D13)."""

    latent_dim: int = Field(512, gt=0, le=2**20, description="Size of the semantic code z (D13: 512).")
    encoder_channels: list[Annotated[int, Field(le=MAX_CHANNELS)]] | None = Field(
        None, max_length=8, description="Channels of the encoder's stride-2 convs, log2(res/4) of them (null: D13 table for the resolution)."
    )
    init_from_student: bool = Field(
        False, description="Start the predictor's middle/decoder from the student's weights (PDAE: false, fresh init)."
    )
    updates: int = Field(gt=0, le=MAX_UPDATES, description="Optimiser updates (not recovered from the paper: required).")
    batch_size: int = Field(128, gt=0, le=MAX_BATCH, description="Images per update (PDAE: 128).")
    lr: float = Field(1e-4, gt=0.0, le=1.0, description="Adam learning rate (PDAE: 1e-4).")
    ema_decay: float = Field(0.9999, ge=0.0, lt=1.0, description="EMA of encoder and predictor (PDAE: 0.9999).")
    grad_clip_norm: float = Field(1.0, gt=0.0, le=1e6, description="Global gradient-norm clip.")
    shift_cutoff_fraction: float = Field(
        0.3, ge=0.0, le=1.0,
        description="Sampling: the shift is off for the last ⌊fraction·K⌋ of K steps (released SFERD sampler: 0.3).",
    )
    shift_parameterization: ShiftParameterization = Field(
        "x0_tweedie",
        description="How G enters the shift x̂₀ + c_t·G (sferd-method.md §7, D15): `x0_tweedie` c_t = σ²/α (released "
        "SFERD/PDAE form; e¹⁰ at t = 1, so Adam barely trains the 1-step shift), `x0_direct` c_t = 1, `v_direct` "
        "c_t = σ_t (a v-space shift). The same family of shifts and the same loss; bench/predictor_forms.py compares them.",
    )

    @field_validator("encoder_channels")
    @classmethod
    def _channels(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(c < 1 for c in v)):
            raise ValueError("encoder channels must be a non-empty list of positive integers")
        return v


class LatentPriorSpec(Model):
    """Diffusion prior over normalised semantic codes (sferd-method.md §8; PDAE/DiffAE design)."""

    width: int = Field(2048, gt=0, le=65_536, description="MLP width (D13: 2048).")
    num_layers: int = Field(10, ge=2, le=256, description="MLP layers (D13: 10).")
    time_emb_dim: int = Field(64, gt=0, le=MAX_CHANNELS, description="Sinusoidal time embedding size (PDAE: 64).")
    updates: int = Field(gt=0, le=MAX_UPDATES, description="Optimiser updates (not recovered from the paper: required).")
    batch_size: int = Field(512, gt=0, le=MAX_BATCH, description="Codes per update (PDAE: 512).")
    lr: float = Field(1e-3, gt=0.0, le=1.0, description="AdamW learning rate (PDAE: 1e-3).")
    weight_decay: float = Field(0.01, ge=0.0, le=1.0, description="AdamW weight decay (PDAE: 0.01).")
    ema_decay: float = Field(0.9999, ge=0.0, lt=1.0, description="EMA (PDAE: 0.9999).")
    sampling_steps: int = Field(100, gt=0, le=1000, description="Latent DDIM steps at sampling (PDAE default: 100).")
    clip_noise: float | None = Field(1.0, gt=0.0, le=1e6, description="Clamp the initial latent noise to ±this (released sampler: 1; null: off).")
    clip_x0: float | None = Field(1.0, gt=0.0, le=1e6, description="Clamp the predicted code to ±this each step (released sampler: 1; null: off).")


class SferdPDMethod(ChainFields):
    """SFERD on progressive distillation: guided-teacher halvings, then a predictor + latent prior per evaluated
    student (D5). `guidance: null` or `predictor: null` give the single-component ablation rows."""

    kind: Literal["sferd"] = Field(description="Method discriminator: `sferd` is SFERD on progressive distillation (SFERD-PD).")
    name: str = Field("sferd", description="Row id in tables and stage names ([a-z0-9-]).")
    label: TableText = Field("SFERD-PD", min_length=1, max_length=80, description="Row label in rendered tables (one line).")
    guidance: GuidanceSpec | None = Field(description="Attention-guided teacher in every halving (null: plain PD teacher).")
    predictor: PredictorSpec | None = Field(description="Semantic gradient predictor per evaluated student (null: none).")
    prior: LatentPriorSpec | None = Field(description="Latent prior; required exactly when a predictor is used.")

    @field_validator("prior")
    @classmethod
    def _prior_iff_predictor(cls, v: LatentPriorSpec | None, info: ValidationInfo) -> LatentPriorSpec | None:
        has_predictor = info.data.get("predictor") is not None
        if has_predictor and v is None:
            raise ValueError("a predictor needs a latent prior to sample its code z at generation time")
        if not has_predictor and v is not None and "predictor" in info.data:
            raise ValueError("a latent prior without a predictor is unused")
        return v

    @model_validator(mode="after")
    def _not_plain_pd(self) -> "SferdPDMethod":
        if self.guidance is None and self.predictor is None:
            raise ValueError("with neither guidance nor predictor this is plain PD: use `kind: pd`")
        return self


# --------------------------------------------------------------------------------------------------- CFD

ClassifierArchitecture = Literal["digits-cnn", "resnet18", "densenet201"]
PretrainedBase = Literal["resnet18", "densenet201"]
PretrainedArchitecture = Literal["pretrained"]
# Architectures whose CIFAR recipe adapts the stem to 32×32 RGB input (sferd/nn/classifiers.py).
CIFAR_ARCHITECTURES = ("resnet18", "densenet201")


class TrainedClassifierSpec(Model):
    """A classifier trained from scratch by a `classifier` stage on the spec's training split (CFD's frozen C).

    RCFD's CIFAR-10 recipe (baselines.md §4): 300 epochs, SGD lr 0.1 ÷10 at 50 % and 75 %, weight decay 5e-4. Its
    batch size and momentum are not recovered (the paper specs say which values they use)."""

    architecture: ClassifierArchitecture = Field(
        description="`digits-cnn` (the quickstart's small CNN, any power-of-two resolution, 10 classes), `resnet18` "
        "or `densenet201` (torchvision's constructors with the stem adapted to 32×32 RGB; GroupNorm for BatchNorm, "
        "so training does not depend on how a batch is split).")
    seed: int = Field(ge=0, lt=SEED_LIMIT, description="Seed of the classifier's training draws (its own: not the FID "
                      "feature network's, so CFD never optimises the features FID measures).")
    updates: int = Field(gt=0, le=MAX_UPDATES, description="Optimiser updates (RCFD: 300 epochs).")
    batch_size: int = Field(gt=0, le=MAX_BATCH, description="Images per update (RCFD: not recovered).")
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="SGD with momentum (RCFD) or Adam.")
    lr: float = Field(gt=0.0, le=10.0, description="Peak learning rate (RCFD: 0.1).")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum (RCFD: not recovered; 0.9 is the common "
                            "CIFAR value). Unused by Adam.")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="L2 weight decay (RCFD: 5e-4).")
    lr_milestones: list[Annotated[float, Field(gt=0.0, lt=1.0)]] = Field(
        default_factory=list, max_length=8,
        description="Fractions of `updates` at which the lr is multiplied by `lr_decay` (RCFD: [0.5, 0.75]).")
    lr_decay: float = Field(0.1, gt=0.0, le=1.0, description="Factor at each milestone (RCFD: 0.1, i.e. ÷10).")
    checkpoint_every_updates: int = Field(1000, gt=0, le=MAX_UPDATES, description="Resumable state interval.")
    random_crop_padding: int = Field(0, ge=0, le=16, description="Random-crop augmentation: pad by this many pixels "
                                     "(reflect) and crop back (the usual CIFAR recipe: 4; digits: 0). Flips follow "
                                     "`dataset.random_flip`.")
    width: int | None = Field(None, ge=8, le=MAX_CHANNELS, description="digits-cnn only: conv channels (null: 32).")
    feature_dim: int | None = Field(None, ge=8, le=MAX_CHANNELS,
                                    description="digits-cnn only: width of the pooled feature f (null: 64).")

    @field_validator("lr_milestones")
    @classmethod
    def _increasing(cls, v: list[float]) -> list[float]:
        if any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError("milestones must increase")
        return v

    @field_validator("width", "feature_dim")
    @classmethod
    def _digits_only(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and info.data.get("architecture") not in (None, "digits-cnn"):
            raise ValueError(f"only digits-cnn has a `{info.field_name}` (torchvision's {info.data['architecture']} "
                             "is fixed)")
        return v


class PretrainedClassifierSpec(Model):
    """A classifier from a local weights file (offline machines: nothing is downloaded): torchvision's ImageNet
    weights of resnet18 / densenet201, checked by SHA-256. Images are upsampled to `input_resolution` and
    normalised with ImageNet's mean and std (CFD: "upsampled to 224 for ImageNet-pretrained classifiers")."""

    architecture: PretrainedArchitecture = Field(description="`pretrained`: weights from a local file.")
    base: PretrainedBase = Field(description="torchvision constructor the file's state_dict belongs to.")
    path: str = Field(min_length=1, max_length=1024, description="The weights file (repo-relative or absolute), e.g. "
                      "torchvision's resnet18-f37072fd.pth; fetched by hand on a connected machine.")
    sha256: str = Field(description="SHA-256 of the file (64 lowercase hex digits).")
    num_classes: int = Field(1000, ge=2, le=100_000, description="Classes of the file's head (ImageNet: 1000).")

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        # it reaches dvc.yaml as the classifier stage's dependency: a validator, not Field(pattern=), which searches
        if not LOCAL_WEIGHTS_RE.fullmatch(v):
            raise ValueError(f"{echo(v)} is not a local weights file: a repo-relative or absolute path of a .pt/.pth "
                             "file in [A-Za-z0-9_.-] and `/`, no `..` or `.` segments, no `~`, no URL")
        if v.startswith(GENERATED_ROOTS):
            raise ValueError(f"{echo(v)} lies in a folder of stage outputs or generated files ({', '.join(GENERATED_ROOTS)}): "
                             "keep fetched weights elsewhere, e.g. assets/")
        return v
    input_resolution: int = Field(224, ge=8, le=1024, description="Images are upsampled (bilinear) to this size.")

    @field_validator("sha256")
    @classmethod
    def _sha(cls, v: str) -> str:
        return _check_sha256(v)


def _classifier_kind(v: Any) -> str | None:
    """`pretrained` or a trained architecture; a missing `architecture` (and anything but a mapping) goes to the
    trained classifier, whose errors say what is missing; an unknown one gives None (UNKNOWN_CHOICE's error, which
    lists every architecture: the trained classifier's own literal error would leave out `pretrained`)."""
    arch = v.get("architecture") if isinstance(v, dict) else getattr(v, "architecture", None)
    if arch == "pretrained":
        return "pretrained"
    if arch is None or arch in get_args(ClassifierArchitecture):
        return "train"
    return None


Classifier = Annotated[
    Union[Annotated[TrainedClassifierSpec, Tag("train")], Annotated[PretrainedClassifierSpec, Tag("pretrained")]],
    Discriminator(_classifier_kind,
                  **_choice_error("architecture", [*get_args(ClassifierArchitecture), *get_args(PretrainedArchitecture)])),
]


class CfdMethod(ChainFields):
    """CFD, classifier-based feature distillation (Sun et al., ICME 2023; baselines.md §4): a PD chain whose
    halvings listed in `cfd_student_steps` replace PD's pixel loss by the classifier loss of sferd/methods/cfd.py
    (no pixel MSE beside it in those halvings, as in the paper); the halvings before them are plain PD halvings
    (and are shared with a PD method of identical chain settings)."""

    kind: Literal["cfd"] = Field(description="Method discriminator.")
    name: str = Field("cfd", description="Row id in tables and stage names ([a-z0-9-]).")
    label: TableText = Field("CFD", min_length=1, max_length=80, description="Row label in rendered tables (one line).")
    cfd_student_steps: list[Annotated[int, Field(ge=1, le=MAX_STEPS)]] = Field(
        min_length=1, max_length=MAX_LIST,
        description="Student step counts of the halvings trained with the CFD loss (RCFD: [4, 2, 1], the halvings "
        "8 → 4 down to 1); every other halving is plain PD.")
    # at least 1e-3: a tinier τ (even a subnormal one passes gt=0) makes f_T/τ overflow and the loss NaN
    temperature: float = Field(ge=1e-3, le=100.0, description="τ: the teacher's feature distribution is "
                               "softmax(f_T/τ); τ < 1 sharpens it (RCFD: 0.95 ResNet-18, 0.9 DenseNet-201).")
    beta: float = Field(ge=0.0, le=1e3, description="β, weight of the dataset-oriented term (RCFD's code flag "
                        "`--alpha`; RCFD: 0.003 ResNet-18, 0 DenseNet-201). 0: feature term only.")
    gamma: float | None = Field(None, ge=0.0, le=1.0, description="γ, mix of the dataset term: γ·(mean per-sample "
                                "entropy) + (1 − γ)·(batch class coverage Σ p̄ log p̄) (RCFD's code flag `--beta`; "
                                "RCFD: 0.75 ResNet-18). Required when beta > 0.")
    coverage_group_size: int | None = Field(
        None, gt=0, le=MAX_BATCH,
        description="Samples over which the class-coverage term's mean distribution p̄ is taken: consecutive groups "
        "of the global batch; required when beta > 0, unused otherwise. Each process and micro-batch must hold whole "
        "groups, so the result does not depend on how the batch is split (RCFD: the per-GPU batch).")
    classifier: Classifier = Field(description="The frozen classifier C (its own stage, shared by identical blocks).")

    @field_validator("cfd_student_steps")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        # that each is a halving of the chain is checked in sferd/spec/checks.py, located at the item
        if len(set(v)) != len(v):
            raise ValueError("step counts repeat")
        return v

    @field_validator("gamma")
    @classmethod
    def _gamma_with_beta(cls, v: float | None, info: ValidationInfo) -> float | None:
        # beta > 0 without gamma is reported at `beta` by sferd/spec/checks.py (an absent field runs no validator)
        beta = info.data.get("beta")
        if beta == 0 and v is not None:
            raise ValueError("gamma is unused with beta = 0: remove it")
        return v

    @field_validator("coverage_group_size")
    @classmethod
    def _group_divides(cls, v: int | None, info: ValidationInfo) -> int | None:
        batch = info.data.get("batch_size")
        if v is not None and info.data.get("beta") == 0:
            raise ValueError("coverage_group_size is unused with beta = 0: remove it")
        if v is not None and batch is not None and batch % v:
            raise ValueError(f"coverage groups of {v} must divide the batch of {batch}")
        return v

    @property
    def guidance(self) -> None:
        return None

    @property
    def predictor(self) -> None:
        return None

    def cfd_params(self) -> dict[str, Any]:
        """The loss settings a CFD halving's stage carries (beside the classifier it reads)."""
        return {"temperature": self.temperature, "beta": self.beta, "gamma": self.gamma,
                "coverage_group_size": self.coverage_group_size}


# ------------------------------------------------------------------------------------- samplers of the teacher

# The sampler family of sferd.diffusion.samplers (same names; this package imports no torch). `gddim_cld` is named
# only to be refused with a clear message: it samples a CLD model's augmented (x, v) state, not a VP teacher.
SolverSampler = Literal["ddim", "euler_pf", "gddim", "d_ddim", "d_gddim", "gddim_cld"]
ORDERED_SAMPLERS = ("gddim", "d_gddim")  # samplers with a multistep order
DODE_SAMPLERS = ("d_ddim", "d_gddim")  # samplers with fitted λ's: they need a calibration stage
MAX_SOLVER_ORDER = 3  # DEIS / gDDIM evaluate Lagrange extrapolation up to order 3; higher orders are unstable
MAX_DODE_FACTOR = 1000  # D-ODE caps its teacher at 1000 steps (baselines.md §5); K itself never needs more


class DODECalibrationSpec(Model):
    """How a D-ODE sampler's λ's are fitted (Kim, Tang & Yu, CVPR 2024; baselines.md §5): the student step follows
    `teacher_sampler` run on the student grid refined K times, greedily, on one calibration batch drawn from one
    global seed (the λ's do not depend on the number of processes; the released code fits per GPU)."""

    teacher_sampler: Literal["ddim", "gddim"] = Field(
        description="The teacher solver the corrected student follows (D-ODE pairs D-DDIM and D-DPM-Solver with a "
        "DDIM teacher): `ddim` or `gddim` (then `teacher_order`).",
    )
    teacher_order: int | None = Field(
        None, ge=0, le=MAX_SOLVER_ORDER,
        description="gDDIM order of the teacher solver; required exactly when teacher_sampler is gddim.",
    )
    factor: int | None = Field(
        None, ge=1, le=MAX_DODE_FACTOR,
        description="K: the teacher takes K× the student's steps at every evaluated NFE (D-ODE: K = 10). Give "
        "`factor` or `teacher_steps`, not both. K ≥ 2: with K = 1 the teacher is the student and every λ is 0.",
    )
    teacher_steps: int | None = Field(
        None, ge=1, le=MAX_STEPS,
        description="A fixed teacher step count for every NFE instead of a factor (D-ODE caps its teacher at 1000 "
        "steps); each evaluated NFE must divide it and be smaller.",
    )
    batch_size: int = Field(
        gt=0, le=MAX_BATCH,
        description="Calibration batch (D-ODE code: 100 per GPU; here one global batch split over the processes).",
    )
    seed: int = Field(
        ge=0, lt=SEED_LIMIT,
        description="Calibration sample k draws its noise (and class) from seed + k, in a stream of its own (never "
        "an FID sample's noise).",
    )

    @field_validator("factor")
    @classmethod
    def _factor(cls, v: int | None) -> int | None:
        if v == 1:
            raise ValueError("factor 1 makes the teacher solver the student itself (every λ is 0, the row is the "
                             "base sampler at extra cost): use K >= 2 (D-ODE: 10)")
        return v

    @field_validator("seed")
    @classmethod
    def _seeds_fit(cls, v: int, info: ValidationInfo) -> int:
        n = info.data.get("batch_size")
        if n is not None and v + n > SEED_LIMIT:
            raise ValueError("calibration seeds run from seed to seed + batch_size − 1, which must stay below 2**59")
        return v

    def teacher_steps_for(self, steps: int) -> int:
        return self.teacher_steps if self.teacher_steps is not None else steps * (self.factor or 0)


class SampledRow(Model):
    """What the rows that sample a model without distilling it share (`kind: solver`, `kind: cld`): their own `steps`
    (declared by each, with its own description), defaulting to `evaluation.student_steps`."""

    @field_validator("steps", check_fields=False)
    @classmethod
    def _steps(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError("step counts repeat")
        return v

    def nfes(self, evaluation: "EvaluationSpec") -> list[int]:
        """The NFEs this row is evaluated at: its own `steps`, else the spec's student step counts."""
        return list(self.steps) if self.steps is not None else list(evaluation.student_steps)


class SolverMethod(SampledRow):
    """The spec's (VP) teacher sampled by a named sampler of the suite's family, no training (gDDIM rows, D-ODE's
    calibrated solvers): a table row that names a sampler and the model, at every evaluated NFE."""

    kind: Literal["solver"] = Field(description="Method discriminator: `solver` samples the teacher with `sampler`.")
    name: str = Field(description="Row id in tables and stage names ([a-z0-9-]).")
    label: TableText = Field(min_length=1, max_length=80, description="Row label in rendered tables (one line).")
    sampler: SolverSampler = Field(
        description="`ddim`, `euler_pf` (Euler on the probability-flow ODE), `gddim` (exponential multistep, "
        "`order`), `d_ddim` / `d_gddim` (D-ODE: the base solver with fitted λ's, `calibration`).",
    )
    order: int | None = Field(
        None, ge=0, le=MAX_SOLVER_ORDER,
        description="Multistep order of gddim / d_gddim (0 is DDIM); required for them, refused for the others.",
    )
    steps: list[Annotated[int, Field(ge=1, le=MAX_STEPS)]] | None = Field(
        None, min_length=1, max_length=MAX_LIST,
        description="NFEs this row is evaluated at (null: evaluation.student_steps), e.g. only those a gDDIM "
        "order can reach.",
    )
    calibration: DODECalibrationSpec | None = Field(
        None, description="D-ODE calibration; required exactly for d_ddim and d_gddim.",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        _check_stem(v)
        if v in RESERVED_METHOD_NAMES:
            raise ValueError(f"{v!r} is the name of a fixed stage (<dataset>-{v}): choose another method name")
        return v

    @field_validator("sampler")
    @classmethod
    def _vp_sampler(cls, v: str) -> str:
        if v == "gddim_cld":
            raise ValueError("gddim_cld samples a critically-damped Langevin (CLD) model's (x, v) state; the spec's "
                             "teacher is a VP model: use ddim, euler_pf, gddim, d_ddim or d_gddim here (CLD rows "
                             "come from a `kind: cld` method)")
        return v


    @property
    def base(self) -> str:
        """The D-ODE base solver (d_ddim → ddim) or the sampler itself."""
        return self.sampler[2:] if self.sampler in DODE_SAMPLERS else self.sampler


def self_chain(start: int | None, end: int | None) -> list[int]:
    if not start or not end or not _is_power_of_two(start) or not _is_power_of_two(end):
        return []
    out, n = [], start // 2
    while n >= end:
        out.append(n)
        n //= 2
    return out


class CLDProcessSpec(Model):
    """Critically-damped Langevin diffusion (Dockhorn, Vahdat & Kreis, ICLR 2022) as gDDIM samples it
    (sferd/diffusion/cld.py): du = F u dt + G dw on the state u = (x, v), critical damping Γ = 2/√M⁻¹."""

    m_inv: float = Field(4.0, gt=0.0, le=1e3, description="M⁻¹, the inverse mass (gDDIM CIFAR-10: 4; baselines.md §6).")
    beta: float = Field(4.0, gt=0.0, le=1e2, description="β, the time scale of the SDE (gDDIM CIFAR-10: 4).")
    gamma: float = Field(
        0.04, gt=0.0, le=1.0, description="γ: initial velocities v₀ ~ N(0, γM) (gDDIM CIFAR-10: 0.04)."
    )
    t_min: float = Field(
        1e-3, gt=0.0, le=0.1,
        description="Smallest time, where sampling ends and the training times start (Σ₀ is singular, so R_t⁻¹ "
        "blows up at 0). Not recovered from gDDIM's paper: a project choice.",
    )

    @model_validator(mode="after")
    def _prior_reached(self) -> "CLDProcessSpec":
        # Σ₁ must be close to the prior N(0, diag(1, M)) the sampler starts from: the mean Ψ(1,0)(x₀, 0) decays as
        # e^{μ}(1 + |μ|) with the double eigenvalue μ = −β Γ M⁻¹/2 = −β √M⁻¹; at μ = −8 (the paper's values) the
        # data's residual weight is 0.003, and a process that barely forgets its data cannot start from noise.
        mu = self.beta * self.m_inv ** 0.5
        if mu < 2.0:
            raise ValueError(f"β·√M⁻¹ = {mu:.3g} < 2: the process keeps more than 40 % of the data at t = 1 "
                             "(the mean decays as e^{−β√M⁻¹}(1 + β√M⁻¹)), so sampling from the prior is wrong")
        if mu > 40.0:
            raise ValueError(f"β·√M⁻¹ = {mu:.3g} > 40 (the paper's is 8): the covariance reaches the prior within "
                             "a few % of t and R_t's ODE turns stiff; rescale time instead")
        return self


class CLDTeacherSpec(Model):
    """A CLD score model trained by its own stage (`cld_teacher`): the suite's U-Net on the 2C channels of (x, v),
    predicting gDDIM's ε (K_t = R_t) of both components (sferd/methods/cld_teacher.py)."""

    kind: Literal["train"] = Field("train", description="`train`: the CLD teacher is trained by a pipeline stage.")
    name: str = Field(
        "cld",
        description="Stage name stem (`<dataset>-<name>-teacher`): CLD rows whose teachers have the same name share "
        "one stage, and must then have identical settings.",
    )
    model: UNetSpec = Field(
        description="The U-Net on the augmented state (input and output 2C channels). gDDIM's network is NCSN++ "
        "\"deep\" (8 res-blocks per level, 128 ch, mult 1,2,2,2, attention at 16), which the suite does not have: a "
        "deviation every spec using it must state."
    )
    process: CLDProcessSpec = Field(default_factory=CLDProcessSpec, description="The CLD constants.")
    mixed_score: bool = Field(
        True,
        description="CLD's mixed score (Dockhorn et al., ICLR 2022, §3.2): the network's output is added to the exact "
        "ε of N(0, I) data, so it learns the residual; without it, short-trained models make the marginally stable "
        "backward flow diverge (sferd/methods/cld_teacher.py).",
    )
    updates: int = Field(gt=0, le=MAX_UPDATES, description="Optimiser updates (gDDIM CIFAR-10: about 1M).")
    batch_size: int = Field(gt=0, le=MAX_BATCH, description="Images per update (gDDIM CIFAR-10: 128).")
    lr: float = Field(gt=0.0, le=1.0, description="Adam learning rate after warm-up (gDDIM CIFAR-10: 2e-4).")
    warmup_updates: int = Field(0, ge=0, le=MAX_UPDATES, description="Linear warm-up length (gDDIM CIFAR-10: 5000).")
    ema_decay: float = Field(0.9999, ge=0.0, lt=1.0, description="EMA of weights; the EMA is sampled (gDDIM: 0.9999).")
    grad_clip_norm: float = Field(1.0, gt=0.0, le=1e6, description="Global gradient-norm clip (not recovered: project choice).")
    checkpoint_every_updates: int = Field(
        500, gt=0, le=MAX_UPDATES, description="Write the resumable training state this often (a killed stage resumes)."
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_stem(v)

    def stage_params(self) -> dict:
        """What determines the teacher's weights (two rows with equal stage params share one stage)."""
        return self.model_dump(mode="json", exclude={"kind", "name"})


class CLDGDDIMSampler(Model):
    kind: Literal["gddim"] = Field(description="gDDIM (Zhang, Tao & Chen, ICLR 2023): exponential integrator in ε, K_t = R_t.")
    order: int = Field(
        2, ge=0, le=3,
        description="Multistep order q: Lagrange extrapolation through the last q+1 ε's (gDDIM's CLD CIFAR-10 "
        "result: q = 2). Each evaluated NFE must take at least q+1 steps.",
    )


class CLDEulerSampler(Model):
    kind: Literal["euler"] = Field(
        description="Plain explicit Euler on the CLD probability-flow ODE, same time grid and NFE (gDDIM's baseline)."
    )


CLDSampler = Annotated[Union[CLDGDDIMSampler, CLDEulerSampler], Field(discriminator="kind")]

# The VP teacher of a spec cannot be sampled as a CLD model: it sees C channels, not (x, v), and predicts VP ε.
_CLD_TEACHER_HINT = ("a CLD row samples a CLD teacher (a U-Net on the (x, v) state, trained by the `cld_teacher` "
                     "stage): write a `teacher:` block with model, updates, batch_size, lr")


class CLDMethod(SampledRow):
    """gDDIM on critically-damped Langevin diffusion: a CLD teacher trained by its own stage, sampled with gDDIM of
    order q or plain Euler at every `evaluation.student_steps` count (= NFE). Not a distillation chain."""

    kind: Literal["cld"] = Field(description="Method discriminator: a CLD teacher and its sampler.")
    name: str = Field(description="Row id in tables and stage names ([a-z0-9-]).")
    label: TableText = Field(min_length=1, max_length=80, description="Row label in rendered tables (one line).")
    teacher: CLDTeacherSpec = Field(description="The CLD teacher this row samples (rows with the same teacher name share its stage).")
    sampler: CLDSampler = Field(description="`gddim` with an `order`, or `euler`.")
    steps: list[Annotated[int, Field(ge=1, le=MAX_STEPS)]] | None = Field(
        None, min_length=1, max_length=MAX_LIST,
        description="NFEs this row is evaluated at (null: evaluation.student_steps), e.g. only those its gDDIM order "
        "can reach, or the larger NFEs a CLD sampler needs beside few-step students.",
    )



    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        _check_stem(v)
        if v in RESERVED_METHOD_NAMES:
            raise ValueError(f"{v!r} is the name of a fixed stage (<dataset>-{v}): choose another method name")
        return v

    @field_validator("teacher", mode="before")
    @classmethod
    def _not_vp(cls, v: Any) -> Any:
        if isinstance(v, str):
            raise ValueError(f"{echo(v)}: the spec's teacher is a VP model (C channels, VP ε or x̂₀); {_CLD_TEACHER_HINT}")
        kind = v.get("kind") if isinstance(v, dict) else None
        if kind == "external":
            raise ValueError("an external checkpoint cannot be a CLD teacher: the suite imports VP teachers only "
                             f"(`teacher_import` checks a C-channel U-Net); {_CLD_TEACHER_HINT}")
        return v


# Later methods join this union; the discriminator keeps errors precise.
Method = Annotated[Union[PDMethod, SferdPDMethod, SolverMethod, CLDMethod, CfdMethod],
                   Field(discriminator="kind")]


# --------------------------------------------------------------------------------------------- evaluation

FeatureExtractor = Literal["digits-cnn", "inception-v3-compat"]
Calibration = Literal["heldout", "noise"]
# Metric options (sferd.metrics.keys.METRIC_OPTIONS) and the values they put in a metrics file (METRIC_VALUES);
# spelled out here because validation must not import anything heavy, and a test keeps the two equal.
MetricOption = Literal["fid", "isc", "prc"]
MetricValue = Literal["fid", "isc", "precision", "recall"]


class EvaluationSpec(Model):
    teacher_steps: list[Annotated[int, Field(le=MAX_STEPS)]] = Field(
        max_length=MAX_LIST,
        description="DDIM step counts at which the (EMA) teacher is evaluated: the no-distillation row ([]: none, "
        "e.g. an ablation whose base table has it)."
    )
    student_steps: list[Annotated[int, Field(le=MAX_STEPS)]] = Field(
        max_length=MAX_LIST,
        description="Student step counts evaluated for every method; each must be produced by its chain."
    )
    num_samples: int = Field(gt=1, le=MAX_SAMPLES, description="Samples per FID (paper: 50k, D8).")
    sample_seed_start: int = Field(
        0, ge=0, lt=SEED_LIMIT, description="Sample k uses seed sample_seed_start + k, independent of batch size (EDM)."
    )
    sample_batch_size: int = Field(
        64, gt=0, le=64, description="Sampling chunk; CPUs fall off a memory cliff above 64 at 32×32."
    )
    feature_extractor: FeatureExtractor = Field(
        description="FID features: `inception-v3-compat` (torch-fidelity standard, D8) or the quickstart's `digits-cnn`."
    )
    reference: Literal["train"] = Field(
        "train", description="Reference set of FID: the training split (D8)."
    )
    feature_weights: str | None = Field(
        None,
        min_length=1,
        max_length=1024,
        description="inception-v3-compat only: a local copy of torch-fidelity's Inception weights (offline "
        "machines; repo-relative or absolute). null: torch hub's cache. Checked before any sampling; its "
        "SHA-256 goes into every metrics file.",
    )
    calibration: list[Calibration] = Field(
        default_factory=list,
        max_length=2,
        description="Calibration rows: `heldout` (held-out vs training images, a floor), `noise` (Gaussian noise images, a ceiling).",
    )
    metrics: list[MetricOption] = Field(
        ["fid"],
        max_length=3,
        description="What every FID stage measures, all by torch-fidelity with `feature_extractor`: `fid` (required), "
        "`isc` (Inception Score from the extractor's class logits, 10 splits), `prc` (precision and recall, k = 3, "
        "of the samples against the reference set). Extra metrics get their own tables below the FID table.",
    )

    @field_validator("student_steps")
    @classmethod
    def _some_steps(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("list at least one step count")
        return v

    @field_validator("teacher_steps", "student_steps")
    @classmethod
    def _steps(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("step counts repeat")
        for s in v:
            if s < 1:
                raise ValueError(f"step count {s} must be >= 1")
        return v

    @field_validator("sample_seed_start")
    @classmethod
    def _seeds_fit(cls, v: int, info: ValidationInfo) -> int:
        n = info.data.get("num_samples")
        if n is not None and v + n > SEED_LIMIT:
            raise ValueError(f"sample seeds run from sample_seed_start to sample_seed_start + num_samples − 1, which "
                             f"must stay below 2**59 (seeds of the per-sample generators)")
        return v

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v: list[str]) -> list[str]:
        if "fid" not in v:
            raise ValueError("`fid` is required: the table is an FID table, other metrics come beside it")
        repeated = sorted({m for m in v if v.count(m) > 1})
        if repeated:
            raise ValueError(f"listed more than once: {', '.join(repeated)}")
        return v


class TableSpec(Model):
    id: str = Field(description="Table id; the Markdown lands at results/tables/<id>.md.")
    title: TableText = Field(min_length=1, max_length=200, description="Heading of the rendered table (one line).")
    paired_against: str | None = Field(
        None,
        max_length=NAME_MAX,
        description="A method name: the table adds, per other method and student step count, the paired difference "
        "method − this method over the spec's seeds (same seed, same steps) with a 95 % Student-t interval, and "
        "writes them to results/tables/<id>-paired.csv. Needs at least 2 `seeds`. null: no paired differences.",
    )

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        return _check_name(v, NAME_MAX + 17)  # + `-<scale profile>` when loaded at a scale


class ReportedRow(Model):
    """Numbers printed in a paper, with their source; `null` values carry the reason."""

    system: TableText = Field(min_length=1, max_length=200, description="Row label, e.g. 'PD (Salimans & Ho)' (one line).")
    method: str | None = Field(None, max_length=NAME_MAX, description="Name of the spec method this row compares with, if any.")
    source: TableText = Field(min_length=1, max_length=300, description="Paper, table and version the numbers come from (one line).")
    metric: MetricValue = Field(
        "fid",
        description="Metric of the values: `fid`, `isc` (Inception Score), `precision` or `recall`; a metric other "
        "than FID must be computed by the spec (`evaluation.metrics`).",
    )
    values: dict[Annotated[int, Field(ge=1, le=MAX_STEPS)], Annotated[float, Field(ge=-1e6, le=1e6)] | None] = Field(
        max_length=MAX_LIST, description="Steps → reported value; null when not transcribed.")
    reason: TableText | None = Field(None, max_length=300, description="Why values are null (required if any is; one line).")

    @model_validator(mode="after")
    def _null_needs_reason(self) -> "ReportedRow":
        if any(v is None for v in self.values.values()) and not self.reason:
            raise ValueError("a null reported value needs a `reason` (we never invent a number)")
        return self


# --------------------------------------------------------------------------------------------------- spec


def _check_scales(v: dict[str, "ScaleProfile"]) -> dict[str, "ScaleProfile"]:
    for name in v:
        _check_stem(name)
        if len(name) > 16:
            # it is appended to the pipeline folder, the table id and every stage name
            raise ValueError(f"scale profile name {name!r} is longer than 16 characters")
    return v


def _check_set_path(key: str) -> str:
    """A key of a profile's `set:` (a per-key validator, so the error points at the key)."""
    if len(key) > 200 or not SET_PATH_RE.fullmatch(key):
        raise ValueError(f"{echo(key)} is not a path: dotted field names, list indices written plainly (0, 1, … in "
                         "ASCII digits, no leading zeros) or `*`")
    return key


class ScaleProfile(Model):
    """A named size override of the spec (sferd/spec/scale.py), chosen with `--scale NAME`."""

    description: str = Field(max_length=2000, description="What the profile is for and what its numbers mean (shown in the table).")
    set: dict[Annotated[str, AfterValidator(_check_set_path)], Any] = Field(
        min_length=1,
        max_length=64,
        description="Dotted path → value, e.g. `teacher.updates: 30`, `methods.*.start_steps: 16`; `*` sets every "
        "item of a list. A whole block may be replaced (`features: {...}`).",
    )




class Spec(Model):
    schema_version: Literal[1] = Field(description="Spec format version.")
    name: str = Field(description="Spec id ([a-z0-9-]).")
    description: str = Field("", max_length=4000, description="What this experiment reproduces.")
    extends: str | None = Field(
        None,
        max_length=1024,
        description="Another spec file (relative to this one) whose set-up fields this spec inherits when it does not "
        "write them: seed, seeds, precision, stage_granularity, dataset, features, teacher, methods, evaluation "
        "(sferd/spec/extends.py).",
    )
    pipeline: str = Field(
        max_length=7 + NAME_MAX + 17,
        description="Folder of the generated dvc.yaml/params.json: '.' (the root pipeline, the quickstart's) or "
        "`stages/<name>` ([a-z0-9-]). It reaches every stage's command, so nothing else is accepted.",
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="Training precision. bf16 = autocast with fp32 master weights; changes results, so it is part "
        "of every training stage's params.",
    )
    stage_granularity: Literal["step", "row"] = Field(
        "step",
        description="How the graph maps to DVC stages. `step`: one stage per halving, per evaluated student's predictor "
        "and prior, per FID cell (each resumable and cached on its own: paper scale). `row`: one stage per chain, per "
        "method's predictor+prior set, per FID row, running the same parts in order in one process; saves a process "
        "start-up (~5 s of imports on a CPU) per part and changes no result (the quickstart).",
    )
    seed: int = Field(ge=0, lt=SEED_LIMIT, description="Seed of every training stage (sampling seeds are in `evaluation`).")
    seeds: list[Annotated[int, Field(ge=0, lt=SEED_LIMIT)]] | None = Field(
        None,
        min_length=1,
        max_length=16,
        description="Repeat every distillation chain (halvings, predictor, prior, FID) once per seed; the table shows "
        "mean ± std over them. Data, feature network and teacher are trained once, with `seed`. null: [seed].",
    )
    dataset: DatasetSpec = Field(description="Data and resolution.")
    features: FeatureNetSpec | None = Field(
        None, description="FID feature network: fixed versioned weights, or trained by a stage (required when "
        "feature_extractor is digits-cnn)."
    )
    teacher: Teacher = Field(description="The diffusion model every method distils: trained by a stage or imported.")
    methods: list[Method] = Field(min_length=1, max_length=16, description="Distillation methods, one chain each.")
    evaluation: EvaluationSpec = Field(description="FID protocol, and any extra metrics.")
    table: TableSpec = Field(description="The rendered table.")
    reported: list[ReportedRow] = Field(default_factory=list, max_length=64, description="Paper numbers shown beside ours.")
    scales: dict[str, ScaleProfile] = Field(
        default_factory=dict,
        max_length=8,
        description="Named scale profiles (e.g. `smoke`: the whole pipeline in minutes on a CPU); `--scale NAME` on "
        "the CLI applies one, into its own pipeline folder, table id and stage names.",
    )
    scale: str | None = Field(
        None, description="The profile this spec was loaded at: set by `--scale NAME`, never written in a spec."
    )

    @field_validator("scales")
    @classmethod
    def _scale_names(cls, v: dict[str, ScaleProfile]) -> dict[str, ScaleProfile]:
        return _check_scales(v)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v)

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"seeds must be distinct, got {v}")
        return v

    @property
    def chain_seeds(self) -> list[int]:
        return list(self.seeds) if self.seeds is not None else [self.seed]

    @field_validator("extends")
    @classmethod
    def _extends(cls, v: str | None) -> str | None:
        # a validator, not Field(pattern=): Pydantic's patterns search rather than match the whole value
        if v is not None and not EXTENDS_RE.fullmatch(v):
            raise ValueError(f"{echo(v)} is not a relative path of a .yaml file ([A-Za-z0-9_.-] and `/`)")
        return v

    @field_validator("pipeline")
    @classmethod
    def _pipeline(cls, v: str) -> str:
        if not PIPELINE_RE.fullmatch(v):
            raise ValueError(f"{echo(v)} is not a pipeline folder: use '.' (the root pipeline) or stages/<name> with "
                             "<name> in [a-z0-9-]")
        return v


class ScalesBlock(BaseModel):
    """Only a spec's `scales` block: checked before a profile is applied (the rest of the spec is validated after)."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)
    scales: dict[str, ScaleProfile] = Field(default_factory=dict, max_length=8)

    @field_validator("scales")
    @classmethod
    def _scale_names(cls, v: dict[str, ScaleProfile]) -> dict[str, ScaleProfile]:
        return _check_scales(v)
