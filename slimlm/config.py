"""Validated configs for every stage: pydantic models (unknown keys rejected), YAML + ``key=value`` overrides.

    cfg = load_config(DistillConfig, "recipe.yaml", ["optim.lr=1e-4", "loss.divergence=jsd"])

Overrides use dotted paths into the YAML tree; values are parsed as YAML scalars (``1e-4``, ``true``,
``[1, 2]``). Any error names the file and the offending key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from slimlm import SlimlmError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskConfig(Strict):
    """What to train on: a built-in task or a user file (schemas in the README)."""

    name: Literal["movielens-ranking", "ranking", "completion", "text", "arithmetic"] = "movielens-ranking"
    data: str | None = None  # file / directory; None = the built-in data of the task
    split: str = "train"
    eval_split: str = "val"
    limit: int | None = Field(None, ge=1)  # training examples (whole groups for ranking, seeded)
    eval_limit: int | None = Field(256, ge=1)
    max_length: int = Field(512, ge=8)  # longer sequences are truncated from the left of the prompt
    # ranking tasks: candidates that share a prefix are packed into one sequence, up to this many (the prefix
    # runs once; each candidate sees the prefix and itself only); MovieLens groups its train ratings to match
    candidates_per_prefix: int = Field(1, ge=1)


class LossSection(Strict):
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"] = "forward_kl"
    beta: float = Field(0.5, ge=0.0, le=1.0)
    alpha: float = Field(0.1, ge=0.0, lt=1.0)
    temperature: float = Field(1.0, gt=0.0)
    kd_weight: float = Field(1.0, ge=0.0)
    ce_weight: float = Field(0.0, ge=0.0)
    chunk_size: int = Field(256, ge=1)  # target tokens per chunk of the fused loss (memory ~ chunk x vocab)
    # torch.compile the per-chunk maths of the closed-form divergences (forward/reverse KL, JSD, CE): "auto"
    # when a chunk's logits tile is large enough to pay for the compile (distill/chunked.compile_closed_form)
    compile: bool | Literal["auto"] = "auto"


class OptimConfig(Strict):
    lr: float = Field(5e-5, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    max_grad_norm: float | None = Field(1.0, gt=0.0)


class OnPolicyConfig(Strict):
    """GKD-style on-policy distillation: a fraction ``lam`` of batches use the student's own samples."""

    lam: float = Field(1.0, ge=0.0, le=1.0)
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(32, ge=1)


class DistillConfig(Strict):
    """One distillation stage. ``mode``:

    * ``sft``: cross-entropy on response tokens only (no teacher);
    * ``kd``: the loss section's divergence to the teacher on the dataset's sequences (+ optional CE);
    * ``on_policy``: like ``kd`` but a fraction ``on_policy.lam`` of batches are the student's samples;
    * ``two_stage``: ``first_stage`` (sft or kd) for ``first_stage_steps``, then on-policy, one command.
    """

    mode: Literal["sft", "kd", "on_policy", "two_stage"] = "kd"
    student: str
    teacher: str | None = None
    out: str
    task: TaskConfig = TaskConfig()
    loss: LossSection = LossSection()
    optim: OptimConfig = OptimConfig()
    on_policy: OnPolicyConfig = OnPolicyConfig()
    first_stage: Literal["sft", "kd"] = "kd"
    first_stage_steps: int | None = Field(None, ge=0)  # two_stage: default half of max_steps
    teacher_signal: Literal["online", "cached"] = "online"
    teacher_cache: str | None = None  # cached signal: directory of top-k log-probs (built from `teacher` if absent)
    cache_top_k: int = Field(64, ge=1)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_steps: int = Field(100, ge=1)  # optimizer steps
    seed: int = 0
    device: str | None = None  # None: slimlm.placement's default (CUDA when torch sees a GPU, else CPU)
    dtype: Literal["float32", "bfloat16"] = "float32"  # student weights (masters under mixed_precision)
    # default: bf16 where training autocasts (mixed_precision on a device with fast bf16), else the device's dtype
    teacher_dtype: Literal["float32", "bfloat16"] | None = None
    parallel: Literal["auto", "none", "ddp", "fsdp2"] = "auto"  # under torchrun; auto = ddp
    gradient_checkpointing: bool = False
    offload_optimizer: bool = False  # AdamW state + fp32 master weights in host memory (for GPU training)
    # bf16 autocast for training's forward passes where bf16 products are fast (slimlm.placement.fast_bf16: CUDA;
    # CPUs with AVX512_BF16 or AMX); elsewhere (older CPUs, where bf16 is emulated) training runs in fp32
    mixed_precision: bool = True
    eval_every: int = Field(50, ge=0)  # 0 = only at the end
    save_every: int = Field(50, ge=0)  # 0 = only at the end
    log_every: int = Field(1, ge=1)
    # the divergence guard (slimlm.distill.guard): a non-finite loss or gradient norm stops the run, and so
    # does either one above divergence_factor x its running median (same mode) once divergence_warmup steps
    # are known; 0 or null turns the spike check off. A checkpoint is written only after the next step's
    # loss and gradient norm on its weights passed, so the one named "last good" is.
    divergence_factor: float | None = Field(100.0, ge=0.0)
    divergence_warmup: int = Field(10, ge=1)
    tensorboard: bool = True
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _check(self) -> DistillConfig:
        cached = self.teacher_signal == "cached"
        if cached and self.mode != "kd":
            raise ValueError("teacher_signal 'cached' works with mode 'kd' only (on-policy samples need a live teacher)")
        if cached and not self.teacher_cache:
            raise ValueError("teacher_signal 'cached' needs teacher_cache (a directory)")
        if self.mode != "sft" and self.teacher is None and not (cached and Path(self.teacher_cache, "index.json").exists()):
            raise ValueError(f"mode '{self.mode}' needs a teacher")
        return self


C = TypeVar("C", bound=BaseModel)


def _set_dotted(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise SlimlmError(f"override {dotted!r}: '{k}' is not a section")
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise SlimlmError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise SlimlmError(f"override {item!r}: value is not valid YAML ({e})") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(model: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Read YAML (optional), apply ``key=value`` overrides, validate; errors name the file and key."""
    tree: dict = {}
    where = "command line"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise SlimlmError(f"{path}: no such config file")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise SlimlmError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(tree, dict):
            raise SlimlmError(f"{path}: expected a mapping at the top level")
    tree = _merge(tree, parse_overrides(overrides or []))
    try:
        return model.model_validate(tree)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise SlimlmError(f"{where}: {loc}: {msg}{more}") from None


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


class PruneConfig(Strict):
    """Structured pruning (``slimlm prune``). A keep target is a fraction of the current size when it is a
    float in (0, 1] (``0.5``) and a count when it is an int (``768``); ``None`` leaves that structure alone.

    * ``mlp_keep``: MLP neurons per layer (``intermediate_size``; fractions are rounded to ``multiple``);
    * ``heads_keep``: query heads per layer; ``head_mode`` ``kv`` removes whole KV groups with their query
      heads (the count must be a multiple of queries-per-KV-head), ``query`` removes the same number of
      query heads from every KV group (a multiple of the KV head count);
    * ``layers_keep``: decoder layers, chosen by ``depth_metric``;
    * ``hidden_keep``: residual-stream channels (``hidden_size``: the embedding, the LM head, every norm and
      every projection's input or output; fractions rounded to ``multiple``), chosen by their calibration
      energy into the maps that read them (weights alone with ``method: magnitude``).
    """

    method: Literal["osscar", "greedy", "activation", "magnitude"] = "osscar"
    mlp_keep: int | float | None = None
    heads_keep: int | float | None = None
    head_mode: Literal["kv", "query"] = "kv"
    layers_keep: int | float | None = None
    hidden_keep: int | float | None = None
    depth_metric: Literal["cosine", "loss"] = "cosine"
    depth_loss_samples: int = Field(16, ge=1)  # calibration sequences for the loss metric (one pass per layer)
    multiple: int = Field(8, ge=1)  # intermediate_size and hidden_size are rounded to a multiple of this
    damping: float = Field(0.01, ge=0.0)  # λ = damping x mean(diag H)
    greedy_steps: int = Field(64, ge=1)  # the greedy removes its groups in about this many batched steps
    local_search_iters: int = Field(100, ge=0)  # accepted swaps per layer at most
    max_swap: int = Field(2, ge=1)  # largest t of the t-for-t swaps tried
    swap_candidates: int = Field(256, ge=1)  # 1-for-1 swaps are scored among this many outs x ins
    # intra-op threads for the solver's CPU work; None: the placement's default (slimlm.placement.solver_threads,
    # which says why), 0: torch's own count
    solver_threads: int | None = Field(None, ge=0)
    calib: str = "text"  # text | movielens-ranking | a .txt/.jsonl/.parquet file
    calib_data: str | None = None  # calib movielens-ranking: its data directory (None: the fetched asset)
    samples: int = Field(128, ge=1)  # calibration sequences
    seq_len: int = Field(256, ge=2)
    batch_size: int = Field(8, ge=1)  # calibration sequences per forward pass
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> PruneConfig:
        for name in ("mlp_keep", "heads_keep", "layers_keep", "hidden_keep"):
            v = getattr(self, name)
            if isinstance(v, bool) or (isinstance(v, float) and not 0.0 < v <= 1.0) or (isinstance(v, int) and v < 1):
                raise ValueError(f"{name} must be a fraction in (0, 1] or a count >= 1, got {v!r}")
        if self.mlp_keep is None and self.heads_keep is None and self.layers_keep is None and self.hidden_keep is None:
            raise ValueError("nothing to prune: set mlp_keep, heads_keep, layers_keep and/or hidden_keep")
        return self
