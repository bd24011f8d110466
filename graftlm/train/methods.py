"""What learns: `train.method`, and in each phase of `train.phases` which part of it.

- full:   every weight.
- lora:   low-rank adapters (peft) on the linear layers of every block; the base weights stay frozen.
- layra:  Layer-Selective LoRA (Owodunni & Kumar 2025): adapters only on the first and last blocks, where a
          multilingual model maps text in and out of its shared middle; the middle blocks stay bit-identical.
- freeze: only the blocks and parameters `train.freeze` chooses.

lora and layra can also train the input embeddings and the output head: all their rows (peft `modules_to_save`)
or only the rows a vocabulary extension added (peft `trainable_token_indices`, saved alone as those rows). full and
freeze train the new rows only by masking the other rows' gradient (`vocab.init.train_only_rows`) and giving the
embeddings no weight decay, so AdamW, whose moments start at zero in each phase, leaves the base rows bit-identical.

Every phase has parameter groups with their own lr (`train.lr_groups`: the new embedding rows, the other embedding
rows, the rest); new rows that share a tensor with base rows get theirs by a scaled update (`scale_row_updates`).

    method = Method.load(cfg, start_model, checkpoint)
    groups = method.start_phase("all")   # sets requires_grad; AdamW's parameter groups, each with an lr_scale
    optimizer = torch.optim.AdamW(groups, ...); scale_row_updates(optimizer)
    apply_lr(optimizer, lr)              # before each step: the phase's lr times each group's lr_scale
    method.export_model()                # a plain transformers model (for peft: a copy with the adapters merged)
    method.save_adapter(folder)          # lora/layra: the adapter alone, loadable with peft
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from graftlm.errors import GraftError
from graftlm.progress import log
from graftlm.runs import read_json, write_json_atomic
from graftlm.train.config import TrainConfig
from graftlm.vocab.init import VocabRows, embedding_weights, train_only_rows, vocab_rows

if TYPE_CHECKING:
    import torch

ADAPTER_DIR = "adapter"
"""A peft adapter folder inside a checkpoint (for resuming) and inside the run directory (the adapter alone)."""
PEFT_EMBEDDING_PARAMETERS = ("modules_to_save", "trainable_tokens_delta")


class Method:
    def __init__(self, model: nn.Module, cfg: TrainConfig, rows: VocabRows | None):
        self.cfg = cfg
        self.kind = cfg.method
        self.rows = rows
        self.peft = cfg.method in ("lora", "layra")
        self.model = _with_adapters(model, cfg, rows) if self.peft else model
        if cfg.method == "freeze":
            _freeze(model, cfg)
        self.trainable = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        self._hooks: list = []
        self.only_new_rows: list[nn.Parameter] = []
        """The current phase's parameters that learn only their new rows."""
        self.row_hooks = True
        """Mask those rows' gradients with hooks (False: the caller masks them, as FSDP's sharding does)."""
        if rows is None and cfg.lr_groups.new_rows != 1:
            log("train: lr_groups.new_rows is ignored: the start model has no new rows (no vocab: section)")

    @classmethod
    def load(cls, cfg: TrainConfig, start_model: Path, checkpoint: Path | None = None,
             trust_remote_code: bool = False) -> "Method":
        """The start model prepared for `cfg.method`, with the weights of `checkpoint` when resuming (a checkpoint
        of full or freeze holds them all; one of lora or layra holds its adapter beside the merged weights)."""
        from graftlm.models import load_model

        plain = cfg.method in ("full", "freeze")
        model = load_model(str(checkpoint if checkpoint is not None and plain else start_model),
                           trust_remote_code=trust_remote_code)
        method = cls(model, cfg, vocab_rows(start_model))
        if checkpoint is not None and method.peft:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(method.model, load_file(checkpoint / ADAPTER_DIR / "adapter_model.safetensors"))
        return method

    def parameters(self, train: str) -> tuple[list[tuple[str, nn.Parameter]], set[int]]:
        """The named parameters a phase trains, and the ids of those of them that learn only their new rows."""
        if self.peft:
            embeddings = [(n, p) for n, p in self.trainable if any(k in n for k in PEFT_EMBEDDING_PARAMETERS)]
            if train != "all" and not embeddings:
                raise GraftError(f"train.phases: a '{train}' phase with method {self.kind} trains the adapter's "
                                 f"embeddings: set train.lora.embeddings")
            if train == "new_rows" and self.cfg.lora.embeddings != "new_rows":
                raise GraftError(f"train.phases: a 'new_rows' phase with method {self.kind} needs "
                                 "train.lora.embeddings: new_rows")
            return (self.trainable if train == "all" else embeddings), set()
        names = {id(p): n for n, p in self.model.named_parameters()}
        embeddings = [(names[id(p)], p) for p in embedding_weights(self.model)]
        if train == "all":
            if not (self.kind == "freeze" and self.cfg.freeze.embeddings == "new_rows"):
                return self.trainable, set()
            _require(self.rows, "train.freeze.embeddings: new_rows")
            return self.trainable, {id(p) for _, p in embeddings}
        if train == "new_rows":
            _require(self.rows, "train.phases: a 'new_rows' phase")
            return embeddings, {id(p) for _, p in embeddings}
        return embeddings, set()

    def start_phase(self, train: str) -> list[dict]:
        """Make exactly the phase's parameters trainable; AdamW's parameter groups (see `param_groups`)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        chosen, only_new_rows = self.parameters(train)
        self.model.requires_grad_(False)
        for _, p in chosen:
            p.requires_grad_(True)
        self.only_new_rows = [p for _, p in chosen if id(p) in only_new_rows]
        if only_new_rows and self.row_hooks:
            self._hooks = train_only_rows(self.model, self.rows.new_rows)
        return self.param_groups(chosen, only_new_rows)

    def param_groups(self, chosen: list[tuple[str, nn.Parameter]], only_new_rows: set[int]) -> list[dict]:
        """AdamW's parameter groups for `chosen`, each with its `lr_scale` (`train.lr_groups`: a multiplier of
        the phase's lr, see `apply_lr`) and weight decay:

        - rest: the blocks or the adapters, at `rest` × lr, with train.weight_decay;
        - embedding matrices (input embeddings, output head, peft's trainable copies of them) at `embeddings` ×
          lr, with train.embeddings_weight_decay; their new rows are rows of the same tensor, and AdamW's update
          does not depend on the gradient's scale, so their lr is set by a `row_scale` [start, stop, factor]
          that multiplies those rows' update after the step (`scale_row_updates`; factor = new_rows /
          embeddings): the same update as a separate parameter at `new_rows` × lr, with the optimizer state and
          the checkpoints unchanged;
        - new rows alone (peft's trainable token rows; a matrix whose other rows are masked) at `new_rows` × lr;
          masked matrices get no weight decay, which would shrink the rows that must not move.
        """
        lr_groups, decay = self.cfg.lr_groups, self.cfg.embeddings_weight_decay
        if self.peft:
            embeddings = {id(p) for n, p in chosen if any(k in n for k in PEFT_EMBEDDING_PARAMETERS)}
        else:
            embeddings = {id(p) for p in embedding_weights(self.model)}
        delta = {id(p) for n, p in chosen if "trainable_tokens_delta" in n}
        matrices = [p for _, p in chosen if id(p) in embeddings and id(p) not in only_new_rows | delta]
        matrix_group = {"params": matrices, "lr_scale": lr_groups.embeddings, "weight_decay": decay}
        factor = lr_groups.new_rows / lr_groups.embeddings
        if self.rows is not None and factor != 1:
            matrix_group["row_scale"] = [self.rows.first_new, self.rows.new_rows.stop, factor]
        groups = [{"params": [p for _, p in chosen if id(p) not in embeddings], "lr_scale": lr_groups.rest},
                  matrix_group,
                  {"params": [p for _, p in chosen if id(p) in only_new_rows], "lr_scale": lr_groups.new_rows,
                   "weight_decay": 0.0},
                  {"params": [p for _, p in chosen if id(p) in delta], "lr_scale": lr_groups.new_rows,
                   "weight_decay": decay}]
        return [g for g in groups if g["params"]]

    def parameters_replaced(self) -> None:
        """Find the trained parameters again after the model's parameter objects were replaced (by sharding)."""
        current = dict(self.model.named_parameters())
        self.trainable = [(name, current[name]) for name, _ in self.trainable]

    def all_phase_parameters(self, trains: list[str]) -> list[tuple[str, nn.Parameter]]:
        """Every parameter some phase trains, once each (what the EMA averages)."""
        seen: dict[int, tuple[str, nn.Parameter]] = {}
        for train in trains:
            for name, p in self.parameters(train)[0]:
                seen.setdefault(id(p), (name, p))
        return list(seen.values())

    def model_size(self) -> int:
        """Parameters of the model itself, adapters and their trainable copies left out."""
        return sum(p.numel() for name, p in self.model.named_parameters()
                   if not (self.peft and ("lora_" in name or any(k in name for k in PEFT_EMBEDDING_PARAMETERS))))

    def export_model(self) -> nn.Module:
        """A plain transformers model with the trained weights (lora/layra: a copy with the adapters merged)."""
        if not self.peft:
            return self.model
        return copy.deepcopy(self.model).merge_and_unload()

    def save_adapter(self, folder: Path, start_model: Path) -> None:
        """The adapter alone, for `PeftModel.from_pretrained(start model, folder)`."""
        self.model.save_pretrained(folder)
        config = folder / "adapter_config.json"
        write_json_atomic(config, {**read_json(config), "base_model_name_or_path": str(start_model.resolve())})


def apply_lr(optimizer: "torch.optim.Optimizer", lr: float) -> None:
    """Set every parameter group to `lr` (the phase's, at this step) times the group's `lr_scale`."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def scale_row_updates(optimizer: "torch.optim.Optimizer") -> list:
    """Multiply the update of the rows named by each group's `row_scale` [start, stop, factor] by `factor`: their
    values are kept before each step and set to `old + factor * (new - old)` after it. With AdamW that is exactly a
    separate parameter at `factor` times the group's lr (the decoupled decay scales with the lr too); a gradient
    hook could not do it, as Adam divides the gradient's scale away. Only a copy of those rows is held during the
    step; the optimizer state is the one AdamW keeps. Returns the hook handles. (Under FSDP2, whose shards split a
    matrix by rows, the same applies to the rows of each local shard: `local_rows`.)"""
    import torch

    kept: list[tuple[torch.Tensor, float, torch.Tensor]] = []

    def before(opt, args, kwargs) -> None:
        kept.clear()
        for group in opt.param_groups:
            if group.get("row_scale"):
                start, stop, factor = group["row_scale"]
                for p in group["params"]:
                    if p.grad is not None:
                        rows = local_rows(p.detach(), start, stop)
                        kept.append((rows, factor, rows.clone()))

    def after(opt, args, kwargs) -> None:
        with torch.no_grad():
            for rows, factor, old in kept:
                rows.sub_(old).mul_(factor).add_(old)
        kept.clear()

    return [optimizer.register_step_pre_hook(before), optimizer.register_step_post_hook(after)]


def local_rows(tensor: "torch.Tensor", start: int, stop: int) -> "torch.Tensor":
    """The rows [start, stop) of a matrix that this process holds, as a view that writes through: all of them for a
    plain tensor; for a DTensor that FSDP2 shards by rows (dim 0, split as torch.chunk splits), those that fall in
    this process's shard (possibly none)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(tensor, DTensor):
        return tensor[start:stop]
    local, mesh = tensor.to_local(), tensor.device_mesh
    chunk = -(-tensor.shape[0] // mesh.size())
    offset = min(mesh.get_local_rank() * chunk, tensor.shape[0])
    if len(local) != min(chunk, tensor.shape[0] - offset):
        raise RuntimeError(f"a {tuple(tensor.shape)} DTensor is not sharded by rows as torch.chunk splits them")
    return local[min(max(start - offset, 0), len(local)):min(max(stop - offset, 0), len(local))]


def trainable_count(params: list[tuple[str, nn.Parameter]], only_new_rows: set[int], rows: VocabRows | None) -> int:
    """Parameters that learn: a row-masked matrix counts only its new rows."""
    return sum(len(rows.new_rows) * p.numel() // p.shape[0] if id(p) in only_new_rows else p.numel()
               for _, p in params)


def _require(rows: VocabRows | None, what: str) -> VocabRows:
    if rows is None:
        raise GraftError(f"{what} trains the new rows of an extended vocabulary, but the start model has none "
                         "(add a vocab: section)")
    return rows


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _blocks(model: nn.Module) -> tuple[str, int]:
    """The name of the model's list of transformer blocks (`model.layers`) and how many there are."""
    lists = [(name, len(m)) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise GraftError(f"train.method: cannot find the transformer blocks of {type(model).__name__}")
    return max(lists, key=lambda item: item[1])


def _with_adapters(model: nn.Module, cfg: TrainConfig, rows: VocabRows | None) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    settings = cfg.lora
    embed = _module_name(model, model.get_input_embeddings()).rsplit(".", 1)[-1]
    head_module = model.get_output_embeddings()
    head = _module_name(model, head_module).rsplit(".", 1)[-1] if head_module is not None else None
    if isinstance(settings.target_modules, list) and head in settings.target_modules:
        raise GraftError(f"train.lora.target_modules: '{head}' is the output head; train it with "
                         "train.lora.embeddings instead")
    tied = head_module is None or head_module.weight is model.get_input_embeddings().weight
    extra: dict = {}
    if settings.embeddings == "all":
        extra = {"modules_to_save": [embed] + ([head] if head else []), "ensure_weight_tying": tied}
    elif settings.embeddings == "new_rows":
        new = list(_require(rows, "train.lora.embeddings: new_rows").new_rows)
        # a tied head follows the embedding's trainable rows by itself
        extra = {"trainable_token_indices": {embed: new} if tied or head is None else {embed: new, head: new}}
    if cfg.method == "layra":
        blocks, count = _blocks(model)
        first, last = cfg.layra.first, cfg.layra.last
        if first + last > count:
            raise GraftError(f"train.layra: first + last ({first} + {last}) exceed the model's {count} blocks")
        extra |= {"layers_to_transform": sorted(set(range(first)) | set(range(count - last, count))),
                  "layers_pattern": blocks.rsplit(".", 1)[-1]}
    targets = settings.target_modules
    if targets == "all-linear":  # spelled out: peft takes no layer selection with its own "all-linear"
        blocks = _blocks(model)[0]
        targets = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                          if isinstance(m, nn.Linear) and name.startswith(blocks + ".")})
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, bias="none",
                        target_modules=targets, task_type="CAUSAL_LM", **extra)
    return get_peft_model(model, config)


def _freeze(model: nn.Module, cfg: TrainConfig) -> None:
    """requires_grad only on what `train.freeze` chooses: its blocks, its name patterns, its embeddings."""
    settings = cfg.freeze
    prefix, count = _blocks(model)
    chosen: set[int] = set()
    for item in settings.layers:
        if isinstance(item, int):
            indices = [item if item >= 0 else count + item]
        else:
            low, high = map(int, item.split("-"))
            indices = list(range(low, high + 1))
        for index in indices:
            if not 0 <= index < count:
                raise GraftError(f"train.freeze.layers: {item} is not a block of this model (it has {count}: "
                                 f"0-{count - 1})")
        chosen.update(indices)
    in_block = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    patterns = [re.compile(p) for p in settings.patterns]
    model.requires_grad_(False)
    for name, p in model.named_parameters():
        block = in_block.match(name)
        if (block and int(block.group(1)) in chosen) or any(pattern.search(name) for pattern in patterns):
            p.requires_grad_(True)
    if settings.embeddings != "none":
        for weight in embedding_weights(model):
            weight.requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise GraftError("train.freeze: the chosen layers and patterns select no parameter of this model")
