"""`SELMTrainer`: trl 1.16's `DPOTrainer` plus SELM's optimism term (docs/DESIGN.md §1).

    loss = -log σ(β·[(log πθ(y_w) - log πref(y_w)) - (log πθ(y_l) - log πref(y_l))])
           + α·β·(log πθ(y_ref) - log πref(y_ref))

with token-summed completion log-probs, the log πref(y_ref) part without gradient, and the mean over the batch.

The trainer overrides DPOTrainer at five seams and nowhere else:
- `_prepare_dataset`: tokenizes `reference_response` exactly like chosen/rejected, starts every sequence with the
  BOS rule of selm/chat.py (trl's chat tokenization adds none: with a BOS-adding tokenizer such as Zephyr's, the one
  place where the sequences differ from DPOTrainer's) and keeps the last `max_prompt_length` prompt tokens and the BOS;
- the collator (`SELMDataCollator`): rows are [chosen; rejected; reference], so one forward scores all three;
- `_set_signature_columns_if_needed`: keeps the reference columns;
- `compute_ref_log_probs` / `_precompute_ref_logps`: reference log-probs of all three completions;
- `_compute_loss`: the SELM loss and its metrics. Batches without reference rows go to DPOTrainer unchanged.

With `prefix_sharing` (selm/prefix_sharing.py) the collator may pack each example into one row; `_sequence_logps`
gives the rest of the trainer the same per-completion log-probs, in the same order, from either layout. With prefix
sharing on, DPO pairs (α = 0, no reference column) take the SELM loss path too, packed or not (one metric path for
all ranks), whose α = 0 loss is DPO's sigmoid loss.
A non-finite loss or gradient stops training before the optimizer step applies it (`compute_loss`, `_get_grad_norm`).

The loss itself is selm/loss.py; the train stage around the trainer is selm/training.py. This file stays over 400
lines because it is one DPOTrainer subclass and its collator: the seams above are methods of the class, each next to
the trl code path it replaces, and the collator's row layout is what `_sequence_logps` reads. The trainer is public
API, used with users' datasets (trl-compatible): it checks `reference_response` itself (`require_reference`, empty
rows), although the pipeline's artifacts were checked when they were read (selm/artifacts.py).
"""

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoProcessor, ProcessorMixin
from trl import DPOTrainer
from trl.data_utils import _tokenize, common_prefix_length, is_conversational
from trl.models import prepare_deepspeed
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import get_config_model_id, pad, use_adapter

from selm import prefix_sharing
from selm.artifacts import REFERENCE
from selm.chat import ConversationTokens
from selm.errors import SELMError, SELMValueError
from selm.lora import match_reference_precision
from selm.loss import selm_loss
from selm.trainer_config import SELMConfig

GROUPS = ("chosen", "rejected", "reference")
# Batch keys that are not model inputs.
NON_MODEL_KEYS = {"completion_mask", "sequence_group", "segment_ids", "ref_chosen_logps", "ref_rejected_logps",
                  "ref_reference_logps"}


def _column_names(dataset) -> list[str]:
    names = dataset.column_names
    if names is None:  # an IterableDataset without known features
        names = list(next(iter(dataset)).keys())
    return list(names)


def _row_lengths(dataset, groups=GROUPS) -> np.ndarray:
    """Longest of a row's sequences, read as Arrow list lengths (no token lists in Python)."""
    import pyarrow.compute as pc

    parts = []
    for batch in dataset.with_format("arrow").iter(batch_size=8192):
        completions = [pc.list_value_length(batch[f"{g}_ids"]).to_numpy() for g in groups]
        parts.append(pc.list_value_length(batch["prompt_ids"]).to_numpy() + np.max(completions, axis=0))
    return np.concatenate(parts)


def _is_streaming(datasets) -> bool:
    """Whether a dataset, or any dataset of a dict of them (eval datasets), is an IterableDataset."""
    values = datasets.values() if isinstance(datasets, dict) else [datasets]
    return any(isinstance(d, IterableDataset) for d in values)


def require_reference(dataset, name: str, alpha: float) -> None:
    """α > 0 is meaningless without y_ref: fail before any tokenization, naming the column (train and eval
    datasets alike: `_prepare_dataset` calls it for each)."""
    if alpha > 0 and REFERENCE not in _column_names(dataset):
        raise SELMError(
            f"{name} dataset: missing column '{REFERENCE}' (alpha={alpha} > 0 needs the generated response y_ref; "
            f"columns are {_column_names(dataset)})"
        )


def _num_groups(inputs) -> int:
    """Completions per example in a SELM-path batch: 3 with a reference, 2 for DPO pairs (packed or not)."""
    return int(inputs["sequence_group"][-1]) + 1


@dataclass
class SELMDataCollator(DataCollatorForPreference):
    """DataCollatorForPreference whose rows are [chosen; rejected; reference] when examples carry `reference_ids`.

    Every row is prompt + completion, truncated to `max_length` like trl does, then all rows are padded together.
    `sequence_group` (0/1/2 per completion) tells the trainer the batch takes the SELM path. With `prefix_sharing`
    'true' (or 'auto' and the estimate says it pays) a batch is one packed row per example instead
    (selm/prefix_sharing.py), DPO pairs too when `pack_pairs`; then every DPO pair batch takes the SELM path, packed
    or not. Each rank decides per batch whether to pack, so both layouts must issue the same collectives: trl's metric
    code gathers other tensors, in other dtypes, than the SELM one (seen: a collective mismatch on 2 ranks).
    """

    prefix_sharing: str = "false"
    area_weight: float = 0.0
    pack_pairs: bool = False

    def torch_call(self, examples):
        groups = GROUPS if "reference_ids" in examples[0] else GROUPS[:2]
        if len(groups) < len(GROUPS) and (self.prefix_sharing == "false" or not self.pack_pairs):
            return super().torch_call(examples)
        if self._packs(examples, groups):
            out = prefix_sharing.pack(examples, groups, self.pad_token_id, self.max_length, self.pad_to_multiple_of)
        else:
            out = self._unshared(examples, groups)
        out["sequence_group"] = torch.arange(len(groups)).repeat_interleave(len(examples))
        for group in groups:
            key = f"ref_{group}_logps"
            if key in examples[0]:
                out[key] = torch.tensor([ex[key] for ex in examples])
        return out

    def _packs(self, examples, groups) -> bool:
        if self.prefix_sharing == "false" or (len(groups) < len(GROUPS) and not self.pack_pairs):
            return False
        if not prefix_sharing.can_pack(examples, self.max_length):
            return False  # an empty prompt has no last token to copy: such a batch stays unshared (same result)
        return self.prefix_sharing == "true" or prefix_sharing.packed_cost_ratio(
            examples, groups, self.max_length, self.area_weight) <= prefix_sharing.AUTO_THRESHOLD

    def _unshared(self, examples, groups):
        ids, masks = [], []
        for group in groups:
            for ex in examples:
                ids.append(ex["prompt_ids"] + ex[f"{group}_ids"])
                masks.append([0] * len(ex["prompt_ids"]) + [1] * len(ex[f"{group}_ids"]))
        if self.max_length is not None:
            if self.truncation_mode == "keep_start":
                cut = slice(None, self.max_length)
            elif self.truncation_mode == "keep_end":
                cut = slice(-self.max_length, None)
            else:
                raise ValueError(f"Unsupported truncation mode: {self.truncation_mode}")
            ids, masks = [x[cut] for x in ids], [m[cut] for m in masks]

        def padded(rows, value):
            return pad([torch.tensor(r, dtype=torch.long) for r in rows], padding_value=value,
                       padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of)

        return {
            "input_ids": padded(ids, self.pad_token_id),
            "attention_mask": padded([[1] * len(r) for r in ids], 0),
            "completion_mask": padded(masks, 0),
        }


class _ArgsWithoutLengthFilter:
    """`args` seen by DPOTrainer._prepare_dataset, minus max_length: its too-long-prompt filter must run after the
    prompt is cut to max_prompt_length (ours), or rows that the cut would save are dropped."""

    max_length = None

    def __init__(self, args):
        self._args = args

    def __getattr__(self, name):
        return getattr(self._args, name)


class SELMTrainer(DPOTrainer):
    """DPOTrainer with SELM's optimism term. `args` is a `SELMConfig` (a DPOConfig with `alpha`, `max_prompt_length`).

    The dataset may carry `reference_response` in the same form as `chosen` (conversational: a list holding the
    assistant message; standard: a string). With α = 0 and no such column this is exactly DPOTrainer.
    """

    _tag_names = ["trl", "dpo", "selm"]
    _name = "SELM"

    def __init__(self, model, ref_model=None, args=None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, **kwargs):
        model_name = model if isinstance(model, str) else get_config_model_id(model.config)
        if args is None:  # as DPOTrainer does, with this trainer's config class
            args = SELMConfig(f"{model_name.split('/')[-1]}-SELM")
        self.alpha = float(getattr(args, "alpha", 0.0))
        # Anything else (None, a list) is left to DPOTrainer, which raises its own ValueError / TypeError for it.
        known = isinstance(train_dataset, (Dataset, IterableDataset))
        columns = _column_names(train_dataset) if known else []
        if _is_streaming(eval_dataset):
            # DPOTrainer does this for a streaming train dataset only. Accelerate's dispatcher slices every batch
            # tensor to the first tensor's length, which cuts the per-completion tensors of packed rows (seen:
            # IndexError in evaluation); without dispatching, each process reads its own batches, as in training.
            args.accelerator_config.dispatch_batches = False
        vision = "image" in columns or "images" in columns  # DPOTrainer's test for a vision dataset
        if REFERENCE in columns:
            self._check_supported(args)
            if vision:
                raise SELMError(f"train dataset: '{REFERENCE}' with images is not supported (the SELM collator is "
                                "text-only); drop the image columns, or train DPO (alpha: 0) without the reference")
        if processing_class is None:
            revision = (args.model_init_kwargs or {}).get("revision") if isinstance(model, str) else None
            processing_class = AutoProcessor.from_pretrained(model_name, revision=revision,
                                                             trust_remote_code=args.trust_remote_code)
        if data_collator is None and not vision:  # vision datasets: DPOTrainer's own collator
            tokenizer = processing_class.tokenizer if isinstance(processing_class, ProcessorMixin) else processing_class
            # DPOTrainer's pad-token rule, which it applies only to a collator it builds itself
            pad_token = args.pad_token or tokenizer.pad_token or tokenizer.eos_token
            if pad_token not in tokenizer.get_vocab():
                raise SELMValueError(f"training config: pad_token {pad_token!r} is not in the vocabulary of "
                                f"{type(processing_class).__name__}; set pad_token to a token it has")
            tokenizer.pad_token = pad_token
            mode, weight = self._prefix_sharing_mode(model, ref_model, args, processing_class, kwargs)
            data_collator = SELMDataCollator(
                pad_token_id=tokenizer.pad_token_id, max_length=args.max_length,
                truncation_mode=args.truncation_mode, pad_to_multiple_of=args.pad_to_multiple_of,
                prefix_sharing=mode, area_weight=weight, pack_pairs=not self._unsupported_settings(args),
            )
        super().__init__(model, ref_model=ref_model, args=args, data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, **kwargs)

    @staticmethod
    def _unsupported_settings(args) -> list[tuple[str, object]]:
        """(key, value) of the loss settings other than DPO's plain sigmoid loss on summed log-probs."""
        checks = {
            "loss_type": (list(args.loss_type) != ["sigmoid"], args.loss_type),
            "f_divergence_type": (str(getattr(args.f_divergence_type, "value", args.f_divergence_type)) != "reverse_kl",
                                  args.f_divergence_type),
            "ld_alpha": (args.ld_alpha is not None, args.ld_alpha),
            "label_smoothing": (args.label_smoothing != 0, args.label_smoothing),
            "use_weighting": (bool(args.use_weighting), args.use_weighting),
            "loss_weights": (args.loss_weights not in (None, [1.0], (1.0,)), args.loss_weights),
        }
        return [(key, value) for key, (bad, value) in checks.items() if bad]

    @classmethod
    def _check_supported(cls, args) -> None:
        """The SELM loss is defined on DPO's sigmoid loss with plain summed log-probs; refuse the other variants."""
        for key, value in cls._unsupported_settings(args)[:1]:
            raise SELMError(f"training config: '{key}' is {value!r}; the SELM loss (with '{REFERENCE}') "
                            "supports only DPO's default sigmoid loss")

    @staticmethod
    def _prefix_sharing_mode(model, ref_model, args, processing_class, kwargs) -> tuple[str, float]:
        """The collator's prefix sharing ('true' / 'auto' / 'false') and its attention-area weight.

        What cannot share a prefix is refused with prefix_sharing: true; 'auto' simply never packs there.
        """
        mode = prefix_sharing.parse_mode(getattr(args, "prefix_sharing", "false"))
        if mode == "false":
            return mode, 0.0
        init_kwargs = args.model_init_kwargs or {}
        config = model.config if not isinstance(model, str) else AutoConfig.from_pretrained(
            model, revision=init_kwargs.get("revision"), trust_remote_code=args.trust_remote_code)
        text = config.get_text_config()
        attention = [m.config._attn_implementation if not isinstance(m, str) else init_kwargs.get("attn_implementation")
                     for m in (model, ref_model) if m is not None]
        peft_config = kwargs.get("peft_config")
        prompt_learning = getattr(peft_config, "is_prompt_learning", False) or (
            is_peft_model(model) and getattr(model.active_peft_config, "is_prompt_learning", False))
        aux_coef = args.router_aux_loss_coef if args.router_aux_loss_coef is not None else getattr(
            text, "router_aux_loss_coef", 0.0)
        obstacles = [
            (any(a is not None and a not in prefix_sharing.SHAREABLE_ATTENTION for a in attention),
             f"cannot run with attn_implementation {attention} (its kernel cannot express a shared prefix); "
             "set attn_implementation: sdpa"),
            (args.truncation_mode == "keep_end", "cannot keep the end of rows (truncation_mode: keep_end); "
             "use keep_start"),
            (prompt_learning, "cannot place prompt-learning PEFT's virtual tokens; train without prefix sharing"),
            (hasattr(text, "output_router_logits") and (aux_coef != 0 or bool(text.output_router_logits)),
             "cannot compute the MoE auxiliary loss (output_router_logits) over packed rows; set "
             "router_aux_loss_coef: 0"),
            (kwargs.get("compute_metrics") is not None, "cannot return the unshared logits compute_metrics needs "
             "(the return_outputs path)"),
            (isinstance(processing_class, ProcessorMixin),
             "supports text-only causal LMs, not processor-backed models"),
        ]
        try:
            prefix_sharing.layer_windows(config)
        except SELMError as e:
            obstacles.append((True, f"cannot mask this model: {e}"))
        for blocked, why in obstacles:
            if blocked and mode == "true":
                raise SELMError(f"training config: prefix_sharing: true {why} (or set prefix_sharing: false)")
            if blocked:
                return "false", 0.0
        return mode, prefix_sharing.area_weight(config)

    # ---- data ----
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        alpha = float(getattr(args, "alpha", 0.0))
        max_prompt_length = getattr(args, "max_prompt_length", None)
        require_reference(dataset, dataset_name, alpha)
        had_prompt = "prompt" in _column_names(dataset)
        dataset = super()._prepare_dataset(dataset, processing_class, _ArgsWithoutLengthFilter(args), dataset_name)
        has_reference = REFERENCE in _column_names(dataset)
        eos = self._tokenizer.eos_token
        tokens = ConversationTokens(self._tokenizer)  # one BOS rule for prompt, chosen, rejected and y_ref

        def add_reference(example, index):
            prompt_ids = tokens.with_bos(example["prompt_ids"])  # trl's chat tokenization adds no BOS
            out = {}
            if has_reference:
                reference = example[REFERENCE]
                if reference is None or (isinstance(reference, list) and not reference):
                    raise SELMError(f"{dataset_name} dataset: row {index}, column '{REFERENCE}': empty")
                if is_conversational(example):
                    if not had_prompt and reference[: len(example["prompt"])] == example["prompt"]:
                        reference = reference[len(example["prompt"]):]  # full conversation given, like chosen
                    kwargs = dict(example.get("chat_template_kwargs") or {})
                    if example.get("tools") is not None:
                        kwargs["tools"] = example["tools"]
                    full = _tokenize(processing_class, example["prompt"] + reference, **kwargs)["input_ids"]
                else:
                    if not had_prompt and reference.startswith(example["prompt"]):
                        reference = reference[len(example["prompt"]):]
                    if not reference.endswith(eos):  # trl appends EOS to standard-format chosen/rejected
                        reference = reference + eos
                    full = _tokenize(processing_class, example["prompt"] + reference)["input_ids"]
                full = tokens.with_bos(full)
                shared = common_prefix_length(prompt_ids, full)
                if shared < len(prompt_ids):
                    # y_ref's tokens diverge from the prompt earlier than y_w's/y_l's: move the prompt's tail into
                    # all three completions so they share one prompt and are scored over the same positions.
                    tail = prompt_ids[shared:]
                    out["chosen_ids"] = tail + example["chosen_ids"]
                    out["rejected_ids"] = tail + example["rejected_ids"]
                    prompt_ids = prompt_ids[:shared]
                out["reference_ids"] = full[shared:]
            out["prompt_ids"] = tokens.keep_prompt_end(prompt_ids, max_prompt_length)  # keeps its BOS
            return out

        map_kwargs = {"desc": f"Tokenizing reference responses of {dataset_name} dataset"} if isinstance(dataset, Dataset) else {}
        dataset = dataset.map(add_reference, with_indices=True, **map_kwargs)
        if args.max_length is not None and args.truncation_mode == "keep_start":
            # Same rule as trl: a prompt that fills max_length leaves no completion token to learn from.
            dataset = dataset.filter(lambda ex: len(ex["prompt_ids"]) < args.max_length)
        return dataset

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for column in ("reference_ids", "ref_reference_logps"):
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    # ---- reference log-probs ----
    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs of one padded batch: (chosen, rejected) or (chosen, rejected, reference)."""
        if "sequence_group" not in inputs:
            return super().compute_ref_log_probs(model, inputs)
        with torch.no_grad():
            return tuple(self._sequence_logps(model, inputs, reference=True)[0].chunk(_num_groups(inputs)))

    def _sequence_logps(self, model, inputs, reference: bool):
        """(token-summed completion log-probs, group-major [chosen..., rejected..., reference...], the fused head's
        outputs) from one forward, of unshared or packed rows alike."""
        model_kwargs = {k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        packed = "segment_ids" in inputs
        if packed:
            unwrapped = self.accelerator.unwrap_model(model)
            model_kwargs["attention_mask"] = prefix_sharing.attention_mask(
                inputs["segment_ids"], inputs["position_ids"], unwrapped.config._attn_implementation, unwrapped.dtype,
                prefix_sharing.layer_windows(unwrapped.config))
        if self.aux_loss_enabled and not reference:
            model_kwargs["output_router_logits"] = True
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        context = contextlib.nullcontext()
        if reference:
            context = contextlib.ExitStack()
            context.enter_context(disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs))
            if self.ref_model is None and is_peft_model(self.model):
                unwrapped = self.accelerator.unwrap_model(self.model)
                context.enter_context(use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None))
            context.enter_context(self.accelerator.autocast())
        with context:
            outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        seq_len = inputs["completion_mask"].size(1) - 1
        # Masked positions are 0 in log_probs, so a sum over a row (or a segment) is the sum over its completion.
        token_logps = outputs.log_probs[:, -seq_len:]
        if packed:
            return prefix_sharing.group_sums(token_logps, inputs["segment_ids"], _num_groups(inputs)), outputs
        return token_logps.sum(dim=1), outputs

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # DPO rows (no reference column) come here too: trl 1.16 hands its results between processes through a cache
        # file that, for an in-memory dataset, lies in a per-process temporary directory, so the other ranks of a
        # multi-process launch cannot open it (seen: FileNotFoundError on rank 1, ZeRO-3 over 2 processes).
        if isinstance(dataset, IterableDataset):
            raise SELMValueError("precompute_ref_log_probs: true needs a map-style dataset, not a streaming one "
                                 "(datasets.IterableDataset), as in DPOTrainer; set precompute_ref_log_probs: false")
        groups = GROUPS if REFERENCE in _column_names(dataset) else GROUPS[:2]
        match_reference_precision(self.accelerator.unwrap_model(self.model))  # QLoRA: reference as trained (selm/lora.py)
        # Scored in order of length, so a batch holds rows of similar length and little padding: this is what makes
        # the precompute pass cheaper than the reference forwards it replaces. Scattered back to row order below.
        order = np.argsort(-_row_lengths(dataset, groups), kind="stable")
        token_columns = ["prompt_ids"] + [f"{g}_ids" for g in groups]
        loader = DataLoader(dataset.select_columns(token_columns).select(order), batch_size=batch_size,
                            collate_fn=self.data_collator, shuffle=False,
                            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory)
        loader = self.accelerator.prepare(loader)
        if self.ref_model is None and self.is_deepspeed_enabled:
            # Before `train`, ZeRO-3 parameters are still sharded: score through an inference engine (as trl does).
            if self._precompute_engine is None:
                self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
            model = self._precompute_engine
        else:
            model = self.ref_model if self.ref_model is not None else self.model
        was_training = model.training
        model.eval()
        scores = [[] for _ in groups]
        for batch in loader:
            for i, logps in enumerate(self.accelerator.gather_for_metrics(self.compute_ref_log_probs(model, batch))):
                scores[i].append(logps.float().cpu())
        model.train(was_training)
        if model is self._precompute_engine:
            # Its ZeRO-3 hooks sit on the policy's modules beside the training engine's, and after a single forward
            # their trace state breaks the training engine's first step (seen: "pop from an empty deque").
            model.destroy()
            self._precompute_engine = None
        inverse = np.argsort(order)
        # Every process holds the gathered scores, so each adds the columns itself: no shared cache file needed.
        for group, group_scores in zip(groups, scores):
            dataset = dataset.add_column(f"ref_{group}_logps", torch.cat(group_scores).numpy()[inverse].tolist())
        return dataset

    # ---- loss ----
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        # Every process learns whether any has a non-finite loss, so all stop together instead of one hanging.
        finite = self.accelerator.gather(torch.isfinite(loss.detach()).all().reshape(1).float()).min().item()
        if finite < 1:
            raise self._stopped(f"the loss is {loss.detach().float().item()}")
        return result

    def _get_grad_norm(self, model, grad_norm=None):
        """transformers' gradient norm, taken after the accumulation and before the optimizer step: a non-finite one
        stops training there, so the step never reaches the weights.

        The norm is global (DDP reduces the gradients first; DeepSpeed and FSDP reduce the norm), so every process
        raises together. Under DeepSpeed the engine has stepped inside `backward` already, but its ZeRO optimizers skip
        a step whose gradient norm is non-finite (bf16 and fp32; DeepSpeed 0.19), so the weights are untouched there
        too. A loss scaler (fp16 AMP, DeepSpeed fp16) skips such steps and lowers its scale, which is normal: no stop.
        """
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        scaled = self.accelerator.scaler is not None or (self.is_deepspeed_enabled and self.args.fp16)
        if grad_norm is not None and not scaled and not math.isfinite(float(grad_norm)):
            raise self._stopped(f"the gradient norm is {float(grad_norm)}")
        return grad_norm

    def _stopped(self, what: str) -> SELMError:
        step = self.state.global_step + 1
        if not self.model.training:
            return SELMError(f"evaluation stopped: {what} (after training step {self.state.global_step})")
        from selm.training import last_complete_checkpoint  # the resume's rule: a half-written one is not "good"

        last = last_complete_checkpoint(self.args.output_dir) if self.args.output_dir else None
        return SELMError(
            f"training stopped at step {step} (epoch {self.state.epoch or 0:.2f}): {what}; the step was not applied, "
            f"the weights are those after step {step - 1}; output_dir {self.args.output_dir}, last good checkpoint "
            f"{last or 'none'}"
        )

    def _compute_loss(self, model, inputs, return_outputs):
        if "sequence_group" not in inputs:
            return super()._compute_loss(model, inputs, return_outputs)
        if return_outputs and "segment_ids" in inputs:
            raise SELMError("compute_loss(return_outputs=True) needs unshared rows; set prefix_sharing: false")
        mode = "train" if self.model.training else "eval"
        groups = GROUPS[: _num_groups(inputs)]
        logps, outputs = self._sequence_logps(model, inputs, reference=False)
        if self.precompute_ref_logps:
            missing = [f"ref_{g}_logps" for g in groups if f"ref_{g}_logps" not in inputs]
            if missing:
                raise SELMError(f"precompute_ref_log_probs: the batch has no {missing}")
            ref = torch.stack([inputs[f"ref_{g}_logps"].to(logps) for g in groups])
        else:
            with torch.no_grad():
                ref_model = self.ref_model if self.ref_model is not None else model
                ref, _ = self._sequence_logps(ref_model, inputs, reference=True)
            ref = ref.view(len(groups), -1)
        logps, ref = logps.view(len(groups), -1), ref.detach()
        loss, terms = selm_loss(logps, ref, self.beta, self.alpha)
        logratios, dpo_losses, optimism = terms["logratios"], terms["dpo_losses"], terms["optimism"]
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())

        self._log_selm_metrics(mode, inputs, outputs, logps, ref, logratios, dpo_losses, optimism)
        if return_outputs:  # trl's deprecated path: compute_metrics wants logits, which the fused head never builds
            with torch.no_grad():
                outputs = model(**{k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS})
            return loss, outputs
        return loss

    def _log_selm_metrics(self, mode, inputs, outputs, logps, ref, logratios, dpo_losses, optimism):
        """trl's DPO metrics (over the chosen and rejected tokens), plus the SELM terms when there is a reference."""
        metrics, acc = self._metrics[mode], self.accelerator
        seq_len = inputs["completion_mask"].size(1) - 1
        chosen, rejected = prefix_sharing.group_token_views(inputs, len(logps))[:2]

        def token_mean(field, *views):  # token-weighted mean over all processes
            values = getattr(outputs, field)[:, -seq_len:].detach()
            total = sum(values[rows][mask].float().sum() for rows, mask in views)
            count = sum(mask.sum() for _, mask in views)
            total, count = (acc.gather_for_metrics(x.reshape(1)).sum() for x in (total, count))
            return (total / count).item() if count > 0 else 0.0

        metrics["entropy"].append(token_mean("entropy", chosen, rejected))
        if mode == "train":
            tokens = (prefix_sharing.unshared_token_count(inputs, len(logps)) if "segment_ids" in inputs
                      else inputs["attention_mask"].sum())  # tokens of the unshared rows, as trl counts them
            self._total_train_tokens += acc.gather_for_metrics(tokens.reshape(1)).sum().item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        metrics["logits/chosen"].append(token_mean("mean_logits", chosen))
        metrics["logits/rejected"].append(token_mean("mean_logits", rejected))
        metrics["mean_token_accuracy"].append(token_mean("is_top1", chosen))

        rewards = self.beta * logratios.detach()
        per_example = {
            "rewards/chosen": rewards[0],
            "rewards/rejected": rewards[1],
            "rewards/accuracies": (rewards[0] > rewards[1]).float(),
            "rewards/margins": rewards[0] - rewards[1],
            "logps/chosen": logps[0].detach(),
            "logps/rejected": logps[1].detach(),
        }
        if optimism is not None:
            per_example.update({
                "rewards/reference": rewards[2],
                "logps/reference": logps[2].detach(),
                "ref_logps/reference": ref[2],
                "loss/dpo": dpo_losses.detach(),
                "loss/optimism": optimism.detach(),
            })
        for key, value in per_example.items():
            metrics[key].append(acc.gather(value.float()).mean().item())


def completion_logps(model, tokenizer, dataset, args):
    """Token-summed log-probs of every row's completions under `model`, computed exactly as in training.

    The trainer's own reference pass does it: `precompute_ref_log_probs` with the model itself as the reference.
    Returns the prepared dataset with `ref_chosen_logps`, `ref_rejected_logps` (and `ref_reference_logps` when the
    rows have a `reference_response`) columns; other columns (e.g. `prompt_id`) are kept to pair rows back, since
    rows the trainer's length rules drop are absent.
    """
    trainer = SELMTrainer(model, ref_model=None, args=scoring_args(args), train_dataset=dataset,
                          processing_class=tokenizer)
    return trainer.train_dataset


def scoring_args(args):
    """`args` for `completion_logps`, which runs in a plain process (Fig. 4: no launcher): precompute on, one device.

    A plain process that sees several GPUs gets n_gpu > 1, for which Trainer wraps the model in nn.DataParallel and
    trl refuses it (after the model is loaded). One GPU does this pass: n_gpu is set to 1, as Trainer itself does for
    a model-parallel model, so the model and every batch go to cuda:0 (the first visible GPU).
    """
    import dataclasses

    args = dataclasses.replace(args, precompute_ref_log_probs=True)
    if args.n_gpu > 1:
        args._n_gpu = 1
    return args
