"""DeepSpeed entry point of one training stage.

Launched by ``libmoe train`` (``libmoe_core.train.launch``) as
``deepspeed --num_gpus N runners/train.py --config RUN/STAGE/config.yaml [--resume]``.
Writes ``metrics.jsonl``, TensorBoard events (``tb/``), checkpoints (``checkpoints/``,
each marked ``COMPLETE`` once every rank wrote it) and the final HF model + processor
(``final/``, moved into place only when complete).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

import torch
import yaml


def parse_args(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--local_rank", type=int, default=-1)  # set by the deepspeed launcher
    return parser.parse_known_args(argv)[0]


def training_arguments(cfg, world_size: int):
    from transformers import TrainingArguments

    from libmoe_core.train.launch import deepspeed_config
    from libmoe_core.train.stages import training_dtype

    on_cpu = not torch.cuda.is_available()
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(cfg.stage_dir / "tb"))
    return TrainingArguments(
        output_dir=str(cfg.checkpoint_dir),
        per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps(world_size),
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        logging_steps=cfg.logging_steps,
        # a NaN/inf loss is logged as it is (transformers' filter would log the window's running mean of its
        # finite steps instead: 0.0 with logging_steps=1)
        logging_nan_inf_filter=False,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=None,  # rotation happens after a checkpoint is marked complete
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=training_dtype(cfg) == torch.bfloat16,
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},  # reentrant: aux losses lose their gradient
        dataloader_num_workers=cfg.dataloader_num_workers,
        remove_unused_columns=False,
        report_to="none",  # TensorBoard through ResumableTensorBoardCallback
        deepspeed=deepspeed_config(cfg.zero_stage),
        use_cpu=on_cpu,
        ddp_backend="gloo" if on_cpu else None,
        disable_tqdm=True,
        save_only_model=False,
    )


def skip_cpu_shm_comm_op() -> None:
    """On CPU, keep DeepSpeed from JIT-compiling its shared-memory all-reduce op.

    The op is compiled on first use (minutes on a fresh machine) and hangs its peers on CPUs
    without AVX2/AVX-512 (DeepSpeed's own note); gloo's all-reduce is what remains, which is
    plenty for the tiny preset. ``LIBMOE_DS_SHM_COMM=1`` turns the op back on.
    """
    if torch.cuda.is_available() or os.environ.get("LIBMOE_DS_SHM_COMM") == "1":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # read by deepspeed.comm.torch.build_shm_op


def main(argv=None) -> int:
    args = parse_args(argv)
    skip_cpu_shm_comm_op()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("libmoe.train")

    from libmoe_core.data.collator import VLMCollator
    from libmoe_core.data.dataset import LLaVADataset
    from libmoe_core.moe import MoELayer
    from libmoe_core.train import checkpoints
    from libmoe_core.train.config import TrainConfig, validate
    from libmoe_core.train.stage_folder import write_run_info
    from libmoe_core.train.stages import (
        dataset_files,
        load_stage_model,
        saved_template,
        stage_template,
        trainable_summary,
    )
    from libmoe_core.train.trainer import (
        AtomicCheckpointCallback,
        MetricsFileCallback,
        MoETrainer,
        ProgressLineCallback,
        ResumableTensorBoardCallback,
        RouterScheduleCallback,
    )

    cfg = TrainConfig(**yaml.safe_load(Path(args.config).read_text()))
    validate(cfg)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.manual_seed(cfg.seed)

    model, processor = load_stage_model(cfg)
    if cfg.zero_stage.startswith("3") and any(isinstance(m, MoELayer) for m in model.modules()):
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, [MoELayer])  # gather a whole MoE layer at once under ZeRO-3
    template = stage_template(cfg, processor)
    annotations, image_folder = dataset_files(cfg)
    dataset = LLaVADataset.from_files(
        annotations, image_folder, policy=cfg.data_policy, decode=cfg.decode_images, tokenizer=processor.tokenizer,
        template=template,
        max_length=cfg.max_length, num_image_tokens=processor.num_image_tokens, logger=log,
        max_skipped_fraction=cfg.max_skipped_fraction,
    )
    if cfg.max_samples is not None:
        dataset.records = dataset.records[: cfg.max_samples]
    collator = VLMCollator(
        processor.tokenizer, template, lambda image: processor.preprocess_images([image])[0],
        processor.image_token_id, processor.num_image_tokens, max_length=cfg.max_length,
        pad_token_id=processor.pad_token_id,
    )
    if rank == 0:
        log.info("stage %s: %s, %d samples from %s, template %s", cfg.stage, trainable_summary(model), len(dataset),
                 annotations, template)

    trainer = MoETrainer(
        model=model, args=training_arguments(cfg, world_size), train_dataset=dataset, data_collator=collator,
        modality_lengths=dataset.modality_lengths if cfg.group_by_modality_length else None,
        max_consecutive_nonfinite_steps=cfg.max_consecutive_nonfinite_steps,
        callbacks=[RouterScheduleCallback(), MetricsFileCallback(cfg.stage_dir / "metrics.jsonl"),
                   ResumableTensorBoardCallback(), ProgressLineCallback(),
                   AtomicCheckpointCallback(cfg.save_total_limit)],
    )
    resume_from = None
    if args.resume:
        resume_from = checkpoints.last_complete_checkpoint(cfg.checkpoint_dir)
        if rank == 0:
            for note in checkpoints.resume_notes(cfg.checkpoint_dir, cfg.max_steps):
                log.info(note)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)

    staging = cfg.stage_dir / ".final-staging"
    trainer.save_model(str(staging))  # gathers ZeRO-3 shards into full HF weights
    if trainer.is_world_process_zero():
        processor.template = saved_template(cfg, processor)  # evaluation prompts as the model was trained
        processor.save_pretrained(staging)
        write_run_info(staging, cfg, trainer.state.global_step)  # a resume of this config then has nothing to do
        checkpoints.publish_dir(staging, cfg.final_dir)
        log.info("final model: %s", cfg.final_dir)
    trainer.accelerator.wait_for_everyone()
    return 0


def exit_after_success(code: int) -> NoReturn:
    """Destroy the process groups, flush the logs and leave without interpreter teardown.

    Everything a run writes is closed by now (checkpoints and the final model are published,
    the TensorBoard writer is closed at train end). Python's normal exit is not safe here:
    the training objects still reference the gloo process groups, so their worker threads
    (``pt_gloo_runloop``, ``gloo_tcp_loop``; seen in both ranks) outlive
    ``destroy_process_group()`` and are destroyed during interpreter teardown while joinable;
    a rank then dies with ``terminate called without an active exception`` (SIGABRT) after a
    successful run, and the launcher fails the whole stage (pytorch/pytorch#190489; measured:
    1 of 20 two-rank ZeRO-3 runs, and 4 of 34 with the process groups destroyed first).
    Only for the success path: after an error, normal exit prints the traceback, and destroying
    a group while a peer is inside a collective would hang.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_after_success(main())
