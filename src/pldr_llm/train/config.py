"""Training settings: :class:`TrainConfig`.

Every field has the original trainer's name where it had one (``learning_rate``, ``warmup_steps``,
``lr_total_steps``, ``lr_alpha``, ``adamw_decay``, ``disable_amp``, ``fsdp_sharding_strategy``,
...). :meth:`TrainConfig.from_hpdict` also takes the original's hyperparameter dictionary, which
mixes architecture keys (ignored here; :class:`pldr_llm.core.config.PLDRConfig` reads them) with
training keys, and maps its spellings (``DAG_reg_coeffs``, ``chkpt_batches``, ...) onto ours.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, cast

from pldr_llm.core.config import ACTIVATION_CHECKPOINTING
from pldr_llm.core.config import ARCHITECTURE_KEYS as MODEL_ARCHITECTURE_KEYS
from pldr_llm.core.errors import PLDRError
from pldr_llm.train.schedule import validate_schedule

__all__ = [
    "TrainConfig",
    "SHARDING_STRATEGIES",
    "ORIGINAL_ALIASES",
    "HPDICT_ALIASES",
    "HPDICT_TRAINING_KEYS",
    "TRAINING_KEYS",
    "ARCHITECTURE_KEYS",
]

# The original's FSDP sharding strategies (FSDP1 names); the FSDP2 equivalents are documented in
# pldr_llm.train.distributed.
SHARDING_STRATEGIES = (
    "FULL_SHARD",
    "HYBRID_SHARD",
    "SHARD_GRAD_OP",
    "_HYBRID_SHARD_ZERO2",
    "NO_SHARD",
)
BACKWARD_PREFETCH = ("PRE", "POST", "NOPREFETCH")
SAVE_TYPES = ("dcp", "torch", "both")
DEVICES = ("auto", "cpu", "cuda")

# The original's flag and hpdict spellings, per section of a run configuration: original -> our
# key. The one table of aliases (``pldr-llm train`` accepts each as a flag or a config key; the
# ``train`` ones are also read from an original hpdict by :meth:`TrainConfig.from_hpdict`).
ORIGINAL_ALIASES: dict[str, dict[str, str]] = {
    "tokenizer": {"tok_model": "path"},
    "model": {"Adff": "A_dff", "gcachelst": "predefined_G"},
    "train": {
        "DAG_reg_coeffs": "dag_reg_coeffs",
        "chkpt_batches": "save_steps",
        "chkpt_epochs": "save_epochs",
        "verbose_freq": "log_every",
        "val_verbose_freq": "val_every",
        "train_batches_cnt": "steps_per_epoch",
        "val_batches_cnt": "val_batches",
        "load_ckpt": "init_from",
        "save_model_path": "run_name",
    },
}
# Original spellings -> TrainConfig field (the ``train`` part of the table above).
HPDICT_ALIASES = ORIGINAL_ALIASES["train"]

# The training keys of the original's hyperparameter dictionary, in its spelling and order
# (``TrainConfig.to_hpdict`` writes them; ``HPDICT_ALIASES`` maps the spellings that differ).
HPDICT_TRAINING_KEYS = (
    "warmup_steps",
    "lr_total_steps",
    "learning_rate",
    "DAG_reg_coeffs",
    "lr_alpha",
    "adamw_decay",
    "disable_amp",
    "auto_size_minimum",
    "disable_fsdp_mixed_precision",
    "fsdp_cpu_offload",
    "fsdp_sharding_strategy",
    "backward_prefetch",
    "epochs",
    "save_type",
)
# Every key of the original's hpdict that describes the run, not the model (PLDRConfig.from_hpdict
# leaves them to TrainConfig.from_hpdict).
TRAINING_KEYS = frozenset(
    {
        *HPDICT_TRAINING_KEYS,
        *HPDICT_ALIASES,
        "save_model_path",
        "device",
        "batch_size",
        "context_length",
        "dag_reg_coeffs",
    }
)

# Keys of the original's hpdict that describe the model; TrainConfig.from_hpdict skips them.
ARCHITECTURE_KEYS = frozenset((*MODEL_ARCHITECTURE_KEYS, "pad_id", "eos_id"))

# Keys of the original that mean nothing here (process launch is torchrun's job); accepted so
# that its hpdicts and scripts load, and ignored.
IGNORED_KEYS = frozenset({"is_train", "enable_full_dist_load", "master_addr", "master_port"})

#: Field metadata of the settings that may change when a run is resumed (see
#: :meth:`TrainConfig.resumable_fields`); any other difference would change what the run computes.
RESUMABLE = {"resumable": True}


def _resumable(default: Any) -> Any:
    """A field that a resumed run may change (speed, logging, checkpoints, length of the run)."""
    return dataclasses.field(default=default, metadata=RESUMABLE)


@dataclass
class TrainConfig:
    """Everything the trainer needs besides the model and the data.

    Batch sizes: ``batch_size`` is the number of sequences one rank consumes per optimizer step
    (the original's "batch size per rank"); it is split into ``grad_accum_steps`` micro-batches.
    ``global_batch_size`` (optional) fixes the number of sequences per optimizer step across all
    ranks instead, so the same config trains identically on 1 or N processes; ``batch_size`` is
    then derived from it and the world size (see :meth:`resolve_batch_size`).

    Fields given with ``_resumable(...)`` may differ when a run is resumed (``learning_rate``
    among them: the trainer re-applies it to the restored schedule, so the advice after a
    divergence, "lower train.learning_rate and resume", can be followed); any other difference
    is refused.

    Attributes:
        learning_rate: peak learning rate of the schedule (AdamW).
        warmup_steps: steps of linear warm-up from 0 to ``learning_rate``.
        lr_total_steps: length of the warm-up + cosine schedule, in steps.
        lr_alpha: the cosine decays to ``lr_alpha * learning_rate``.
        adamw_decay: AdamW's decoupled weight decay.
        betas: AdamW's two betas.
        eps: AdamW's epsilon.
        clip_grad_value: clip every gradient element to [-v, v]; null: no clipping.
        dag_reg_coeffs: DAG loss coefficients [c_A, c_AP, c_G]; all 0: no DAG loss (v510_dag).
        disable_amp: train in float32 on GPU instead of bfloat16 autocast.
        batch_size: sequences per optimizer step on each rank.
        global_batch_size: sequences per optimizer step across ranks (sets batch_size).
        grad_accum_steps: micro-batches per optimizer step.
        max_steps: stop after this many optimizer steps; null: after ``epochs``.
        epochs: passes over the training data.
        steps_per_epoch: optimizer steps per epoch; null: one pass over the data.
        seed: random seed of the initial weights and the data order.
        device: auto, cpu, cuda or cuda:N.
        max_nonfinite_steps: stop (diverged) after more steps with a non-finite loss.
        log_every: a log line and running means every N steps.
        val_every: validate every N steps; null: never.
        val_batches: batches per validation.
        tensorboard: write TensorBoard events; null: when the package is installed.
        progress: show a progress bar; null: when stderr is a terminal.
        save_every: a checkpoint every N steps; null: none but the listed ones.
        save_steps: checkpoints at these steps.
        save_epochs: checkpoints at the end of these epochs.
        save_at_end: a checkpoint and the exported model at the end of the run.
        keep_last: keep this many checkpoints; null: all.
        save_type: checkpoint format: dcp, torch or both.
        export_pth: also export the model in the original's .pth format (original/).
        init_from: start from these weights (what --model takes, a .pth or .safetensors file,
            or a checkpoint folder of a run).
        run_name: the run's name (the original's save_model_path).
        fsdp_sharding_strategy: FSDP sharding: FULL_SHARD, SHARD_GRAD_OP, HYBRID_SHARD, NO_SHARD.
        fsdp_cpu_offload: keep FSDP parameters on the CPU.
        disable_fsdp_mixed_precision: FSDP computes in float32.
        fsdp_reduce_dtype: dtype of FSDP's gradient reduction: float32 or bfloat16.
        backward_prefetch: FSDP's backward prefetch: PRE, POST or NOPREFETCH.
        auto_size_minimum: FSDP wraps modules of at least this many parameters.
        compile: torch.compile the whole model.
        chunked_loss: compute the loss chunk by chunk inside the forward, never the full float32 logits (null: on with CUDA).
        compile_layers: torch.compile each decoder layer on its own (null: on with CUDA, off on the CPU).
        cuda_graphs: replay each compiled layer's forward and backward as CUDA graphs (null: on with CUDA, off under FSDP).
        fused_optimizer: fused AdamW that skips a non-finite step on the device, without a host sync (null: on with CUDA).
        attn_implementation: attention kernel: sdpa (fused, the default) or eager (the original's exact arithmetic).
        activation_checkpointing: recompute activations in backward to save memory: off, layer (each decoder layer) or selective (its attention block only).
        prefetch_batches: batches a background thread prepares ahead of the step (0: on the main thread).
        peak_tflops: the device's peak bf16 TFLOP/s, the denominator of the logged MFU (989: H100/H200 dense).
    """

    # --- optimization (AdamW with decoupled weight decay, the original's constants)
    learning_rate: float = _resumable(1e-3)
    warmup_steps: int = 2000
    lr_total_steps: int = 250_000
    lr_alpha: float = 0.1
    adamw_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-5
    clip_grad_value: float | None = 1.0
    dag_reg_coeffs: tuple[float, float, float] = (0.0, 0.0, 0.0)
    disable_amp: bool = _resumable(False)

    # --- batches and length of the run
    batch_size: int = _resumable(16)
    global_batch_size: int | None = None
    grad_accum_steps: int = 1
    max_steps: int | None = _resumable(None)
    epochs: int = _resumable(1)
    steps_per_epoch: int | None = _resumable(None)
    seed: int = 1234
    device: str = _resumable("auto")

    # --- faults
    max_nonfinite_steps: int = _resumable(20)

    # --- metrics and validation
    log_every: int = _resumable(100)
    val_every: int | None = _resumable(None)
    val_batches: int = _resumable(20)
    tensorboard: bool | None = _resumable(None)
    progress: bool | None = _resumable(None)

    # --- checkpoints and exports
    save_every: int | None = _resumable(None)
    save_steps: tuple[int, ...] = _resumable(())
    save_epochs: tuple[int, ...] = _resumable(())
    save_at_end: bool = _resumable(True)
    keep_last: int | None = _resumable(3)
    save_type: str = _resumable("dcp")
    export_pth: bool = _resumable(True)
    init_from: str | None = _resumable(None)
    run_name: str | None = _resumable(None)

    # --- distributed (the original's FSDP keys)
    fsdp_sharding_strategy: str = _resumable("FULL_SHARD")
    fsdp_cpu_offload: bool = _resumable(False)
    disable_fsdp_mixed_precision: bool = _resumable(False)
    fsdp_reduce_dtype: str = _resumable("float32")
    backward_prefetch: str = _resumable("PRE")
    auto_size_minimum: int | None = _resumable(None)
    compile: bool = _resumable(False)

    # --- speed levers (docs/training.md). ``None`` means "on when training on a GPU, off on the
    # CPU"; ``false`` turns one off. ``chunked_loss``: the LM loss computed chunk by chunk from
    # the hidden states inside the model's forward (no [B, L, V] float32 logits).
    # ``compile_layers``: each decoder layer compiled on its own (``compile`` compiles the whole
    # model instead). ``cuda_graphs``: the compiled layers replay as CUDA graphs (needs
    # ``compile_layers``). ``fused_optimizer``: fused AdamW, which also skips a non-finite step
    # on the device. ``attn_implementation``: "sdpa" (fused kernels) or "eager" (the original's
    # arithmetic); ``None`` keeps the model's (sdpa).
    chunked_loss: bool | None = _resumable(None)
    compile_layers: bool | None = _resumable(None)
    cuda_graphs: bool | None = _resumable(None)
    fused_optimizer: bool | None = _resumable(None)
    attn_implementation: str | None = _resumable(None)
    # Memory for compute (PLDRModel.set_activation_checkpointing): "layer" keeps only each decoder
    # layer's input and recomputes the layer in backward, "selective" recomputes its attention
    # block (PLGA) only. The gradients are the same, so a resumed run may change it.
    activation_checkpointing: str = _resumable("off")
    # Batches prepared (tokenized, checked, pinned) ahead by a background thread; 0: inline.
    prefetch_batches: int = _resumable(4)
    # Peak dense bf16 TFLOP/s of one accelerator, for the MFU figure (989: H100/H200 SXM).
    peak_tflops: float = _resumable(989.0)

    def __post_init__(self) -> None:
        # (the lengths are checked below)
        self.betas = cast("tuple[float, float]", tuple(float(b) for b in self.betas))
        self.dag_reg_coeffs = cast(
            "tuple[float, float, float]", tuple(float(c) for c in self.dag_reg_coeffs)
        )
        self.save_steps = tuple(int(s) for s in (self.save_steps or ()))
        self.save_epochs = tuple(int(s) for s in (self.save_epochs or ()))
        if isinstance(self.fsdp_sharding_strategy, str):
            self.fsdp_sharding_strategy = self.fsdp_sharding_strategy.upper()
        if isinstance(self.backward_prefetch, str):
            self.backward_prefetch = self.backward_prefetch.upper()
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check every field; raise :class:`PLDRError` naming the first bad key."""
        _positive_float("learning_rate", self.learning_rate, allow_zero=True)
        validate_schedule(self.lr_total_steps, self.warmup_steps, self.lr_alpha)
        _positive_float("adamw_decay", self.adamw_decay, allow_zero=True)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise PLDRError(f"'betas' must be two numbers in [0, 1), got {self.betas!r}")
        _positive_float("eps", self.eps)
        if self.clip_grad_value is not None:
            _positive_float("clip_grad_value", self.clip_grad_value)
        if len(self.dag_reg_coeffs) != 3 or any(c < 0 for c in self.dag_reg_coeffs):
            raise PLDRError(
                f"'dag_reg_coeffs' must be three non-negative numbers [c_A, c_AP, c_G], "
                f"got {list(self.dag_reg_coeffs)!r}"
            )
        _positive_int("batch_size", self.batch_size)
        if self.global_batch_size is not None:
            _positive_int("global_batch_size", self.global_batch_size)
        _positive_int("grad_accum_steps", self.grad_accum_steps)
        if self.max_steps is not None:
            _positive_int("max_steps", self.max_steps, allow_zero=True)
        _positive_int("epochs", self.epochs)
        if self.steps_per_epoch is not None:
            _positive_int("steps_per_epoch", self.steps_per_epoch)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise PLDRError(f"'seed' must be an integer, got {self.seed!r}")
        if self.device not in DEVICES and not str(self.device).startswith("cuda:"):
            raise PLDRError(f"'device' must be one of {DEVICES}, got {self.device!r}")
        _positive_int("max_nonfinite_steps", self.max_nonfinite_steps, allow_zero=True)
        _positive_int("log_every", self.log_every)
        if self.val_every is not None:
            _positive_int("val_every", self.val_every)
        _positive_int("val_batches", self.val_batches)
        if self.save_every is not None:
            _positive_int("save_every", self.save_every)
        for s in self.save_steps:
            _positive_int("save_steps", s)
        for s in self.save_epochs:
            _positive_int("save_epochs", s)
        if self.keep_last is not None:
            _positive_int("keep_last", self.keep_last)
        if self.save_type not in SAVE_TYPES:
            raise PLDRError(f"'save_type' must be one of {SAVE_TYPES}, got {self.save_type!r}")
        if self.fsdp_sharding_strategy not in SHARDING_STRATEGIES:
            raise PLDRError(
                f"'fsdp_sharding_strategy' must be one of {SHARDING_STRATEGIES}, "
                f"got {self.fsdp_sharding_strategy!r}"
            )
        if self.backward_prefetch not in BACKWARD_PREFETCH:
            raise PLDRError(
                f"'backward_prefetch' must be one of {BACKWARD_PREFETCH}, got {self.backward_prefetch!r}"
            )
        if self.fsdp_reduce_dtype not in ("float32", "bfloat16"):
            raise PLDRError(
                f"'fsdp_reduce_dtype' must be 'float32' or 'bfloat16', got {self.fsdp_reduce_dtype!r}"
            )
        if self.auto_size_minimum is not None:
            _positive_int("auto_size_minimum", self.auto_size_minimum)
        for name in ("chunked_loss", "compile_layers", "cuda_graphs", "fused_optimizer"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise PLDRError(f"{name!r} must be true, false or null (auto), got {value!r}")
        if self.attn_implementation not in (None, "sdpa", "eager"):
            raise PLDRError(
                f"'attn_implementation' must be 'sdpa' or 'eager', got {self.attn_implementation!r}"
            )
        if self.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
            raise PLDRError(
                f"'activation_checkpointing' must be one of {', '.join(ACTIVATION_CHECKPOINTING)}, "
                f"got {self.activation_checkpointing!r}"
            )
        _positive_int("prefetch_batches", self.prefetch_batches, allow_zero=True)
        _positive_float("peak_tflops", self.peak_tflops)

    # ------------------------------------------------------------------ derived values
    @property
    def weight_decay(self) -> float:
        """AdamW's decoupled weight decay (the original's ``adamw_decay``)."""
        return self.adamw_decay

    @property
    def use_dag_loss(self) -> bool:
        return any(c > 0 for c in self.dag_reg_coeffs)

    def levers(self, device_type: str, sharded: bool = False) -> dict[str, bool]:
        """The speed levers in effect on ``device_type`` ("cuda" or "cpu"), with FSDP or not.

        Each ``None`` field resolves to on for CUDA and off otherwise, with two exceptions:
        ``compile`` (the whole model) replaces the per-layer compilation, and CUDA graphs, which
        need compiled layers, are on under FSDP only when asked for (``true``): FSDP frees and
        re-gathers the layers' parameters every step, and CUDA-graph trees answer the changed
        addresses by re-recording.
        """
        gpu = device_type == "cuda"

        def on(value: bool | None, default: bool = gpu) -> bool:
            return default if value is None else bool(value)

        compile_layers = on(self.compile_layers) and not self.compile
        return {
            "chunked_loss": on(self.chunked_loss),
            "compile_layers": compile_layers,
            "cuda_graphs": gpu and compile_layers and on(self.cuda_graphs, not sharded),
            "fused_optimizer": on(self.fused_optimizer),
        }

    def resolve_batch_size(self, world_size: int) -> int:
        """Sequences per rank per optimizer step, checked against ``world_size`` and accumulation.

        Raises :class:`PLDRError` naming the key when the combination is impossible.
        """
        if self.global_batch_size is not None:
            if self.global_batch_size % world_size:
                raise PLDRError(
                    f"'global_batch_size' ({self.global_batch_size}) is not divisible by the "
                    f"world size ({world_size})"
                )
            per_rank = self.global_batch_size // world_size
        else:
            per_rank = self.batch_size
        if per_rank % self.grad_accum_steps:
            key = "global_batch_size" if self.global_batch_size is not None else "batch_size"
            raise PLDRError(
                f"'{key}' gives {per_rank} sequences per rank, which 'grad_accum_steps' "
                f"({self.grad_accum_steps}) does not divide"
            )
        return per_rank

    def total_steps(self) -> int | None:
        """Optimizer steps the run makes: ``max_steps``, else ``epochs * steps_per_epoch``.

        ``None`` means "until the data runs out ``epochs`` times".
        """
        if self.max_steps is not None:
            return self.max_steps
        if self.steps_per_epoch is not None:
            return self.epochs * self.steps_per_epoch
        return None

    # ------------------------------------------------------------------ dict forms
    @classmethod
    def resumable_fields(cls) -> frozenset[str]:
        """The fields a resumed run may change (declared with ``_resumable`` on the field)."""
        return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("resumable"))

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from our own key names; an unknown key is an error that names it."""
        known = set(cls.field_names())
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known:
                raise PLDRError(f"unknown training key {key!r}")
            kwargs[key] = value
        return cls(**kwargs)

    @classmethod
    def from_hpdict(cls, hpdict: dict[str, Any], **overrides: Any) -> TrainConfig:
        """Build from the original's hyperparameter dictionary (training keys; model keys skipped).

        ``train_batches_cnt`` sets ``steps_per_epoch`` and, as in the original, also
        ``lr_total_steps`` unless that is given too. ``device`` ``"cuda"`` is honoured.
        """
        known = set(cls.field_names())
        kwargs: dict[str, Any] = {}
        for key, value in hpdict.items():
            name = HPDICT_ALIASES.get(key, key)
            if key in ARCHITECTURE_KEYS or key in IGNORED_KEYS:
                continue
            if name not in known:
                raise PLDRError(f"unknown training key {key!r}")
            kwargs[name] = value
        if "train_batches_cnt" in hpdict and "lr_total_steps" not in hpdict:
            kwargs["lr_total_steps"] = hpdict["train_batches_cnt"]
        for key in ("save_steps", "save_epochs"):
            if kwargs.get(key) is None:
                kwargs.pop(key, None)
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict (lists, not tuples) suitable for YAML/JSON."""
        out: dict[str, Any] = {}
        for name in self.field_names():
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_hpdict(self) -> dict[str, Any]:
        """The training keys of the original's hyperparameter dictionary (its spellings)."""
        values = self.to_dict()
        return {key: values[HPDICT_ALIASES.get(key, key)] for key in HPDICT_TRAINING_KEYS}


def _positive_int(name: str, value: Any, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        kind = "a non-negative" if allow_zero else "a positive"
        raise PLDRError(f"{name!r} must be {kind} integer, got {value!r}")


def _positive_float(name: str, value: Any, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        kind = "a non-negative" if allow_zero else "a positive"
        raise PLDRError(f"{name!r} must be {kind} number, got {value!r}")
