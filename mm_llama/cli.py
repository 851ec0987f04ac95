"""``mm-llama``: the command line.

``mm-llama fit|validate|test|predict`` is a LightningCLI over
:class:`~mm_llama.training.module.AdapterModule` and
:class:`~mm_llama.training.datamodule.ImageDataModule`::

    mm-llama fit --config configs/image.yaml
    mm-llama fit --config configs/image.yaml --print_config
    mm-llama test --config configs/image.yaml --ckpt_path runs/image-cli/checkpoints/last.ckpt

``mm-llama make-shards ...`` writes the built-in shape shards; ``mm-llama generate``
answers a prompt about an image with a checkpoint, ``mm-llama demo`` serves the gradio app::

    mm-llama generate --checkpoint runs/image/adapter.ckpt --image x.png "Describe the image."
    mm-llama demo --checkpoint runs/image/adapter.ckpt --port 7860
"""

from __future__ import annotations

import os
import sys
from typing import Any, Sequence

from pathlib import Path

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from mm_llama.checkpoint_files import check_checkpoint_file
from mm_llama.training import checkpoint_io
from mm_llama.training.console import PartsSummary, StepProgressBar, quiet_lightning
from mm_llama.training.datamodule import ImageDataModule
from mm_llama.training.module import AdapterModule
from mm_llama.training.run_config import trainer_defaults

LIGHTNING_SUBCOMMANDS: dict[str, str] = {
    "fit": "train the adapters",
    "validate": "run one validation epoch",
    "test": "evaluate on the test split",
    "predict": "generate answers for the test split",
}
OTHER_SUBCOMMANDS: dict[str, str] = {
    "make-shards": "write the built-in train/val/test shards (mm-llama make-shards --help)",
    "generate": "answer a prompt about an image with a checkpoint (mm-llama generate --help)",
    "demo": "serve the gradio demo app for a checkpoint (mm-llama demo --help)",
}


class AdapterCLI(LightningCLI):
    """LightningCLI whose data module follows the model's system prompt."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The data module is ImageDataModule unless the config names another (``data: class_path:
        # mm_llama.training.speech_datamodule.SpeechDataModule`` in configs/speech.yaml); a plain
        # ``data:`` mapping sets the init arguments of the default.
        parser.set_defaults({"data": {"class_path": f"{ImageDataModule.__module__}.{ImageDataModule.__name__}"}})
        # Training examples and evaluation prompts must use the same system message.
        parser.link_arguments("model.system_prompt", "data.init_args.system_prompt")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Lightning's trainer, with :class:`~mm_llama.training.console.StepProgressBar` and
        :class:`~mm_llama.training.console.PartsSummary` unless the config turns them off
        (``enable_progress_bar`` / ``enable_model_summary``) or brings its own (``trainer.callbacks``)."""
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        callbacks = kwargs.get("callbacks", trainer_cfg.get("callbacks")) or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        ours = {"enable_progress_bar": (ProgressBar, lambda: StepProgressBar(self.subcommand or "fit")),
                "enable_model_summary": (ModelSummary, PartsSummary)}
        for switch, (kind, make) in ours.items():
            if trainer_cfg.get(switch) is not False and not any(isinstance(c, kind) for c in callbacks):
                callbacks.append(make())
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then refuse a truncated ``--ckpt_path`` with an error naming it.

        LightningCLI unpickles ``--ckpt_path`` for its hyper-parameters before any trainer
        (and so before :class:`~mm_llama.training.checkpoint_io.AtomicCheckpointIO`) exists.
        """
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and os.path.isfile(ckpt_path):  # not "last" / "best", which Lightning resolves
            check_checkpoint_file(ckpt_path)


class SaveConfigBesideCheckpoints(SaveConfigCallback):
    """Also writes ``config.yaml`` into every ModelCheckpoint directory, beside the checkpoints.

    Written when training starts, after ModelCheckpoint has checked that its directory
    is new (so the config file alone never triggers its "not empty" warning).
    """

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                Path(callback.dirpath).mkdir(parents=True, exist_ok=True)
                self.parser.save(self.config, str(Path(callback.dirpath) / self.config_filename),
                                 skip_none=False, overwrite=True)


def usage() -> str:
    width = max(map(len, {**LIGHTNING_SUBCOMMANDS, **OTHER_SUBCOMMANDS}))
    lines = [f"  {name:<{width}}  {text}" for name, text in {**LIGHTNING_SUBCOMMANDS, **OTHER_SUBCOMMANDS}.items()]
    return (
        "usage: mm-llama <subcommand> [options]\n\nsubcommands:\n" + "\n".join(lines)
        + "\n\nexample: mm-llama fit --config configs/image.yaml   (add --help to a subcommand for its options)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mm-llama`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    jsonargparse reports bad options or config keys itself and exits with code 2.
    """
    from_sys = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "make-shards":
        from mm_llama.data.scenes import main as make_shards

        return make_shards(rest)
    if command == "generate":
        from mm_llama.inference import main as generate

        return generate(rest)
    if command == "demo":
        from mm_llama.demo.app import main as demo

        return demo(rest)
    if command not in LIGHTNING_SUBCOMMANDS:
        print(f"mm-llama: unknown subcommand {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    quiet_lightning()
    AdapterCLI(**cli_kwargs(), args=None if from_sys else argv)  # None: LightningCLI reads sys.argv itself
    return 0


def cli_kwargs() -> dict[str, Any]:
    """What ``mm-llama`` passes to :class:`AdapterCLI` besides ``args``. ``AdapterCLI(**cli_kwargs(),
    run=False, args=["--config", path])`` builds a config's model, data module and trainer without
    running anything (no subcommand then)."""
    return dict(
        model_class=AdapterModule,
        datamodule_class=ImageDataModule,
        subclass_mode_data=True,  # ImageDataModule or a subclass (SpeechDataModule)
        # Atomic checkpoint writes and a clear error for a corrupt --ckpt_path (checkpoint_io.py).
        trainer_defaults={**trainer_defaults(), "plugins": [{"class_path": checkpoint_io.CLASS_PATH}]},
        save_config_callback=SaveConfigBesideCheckpoints,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "mm-llama"},
        auto_configure_optimizers=False,  # AdapterModule's `optim` owns the optimizer and schedule
    )


if __name__ == "__main__":
    raise SystemExit(main())
