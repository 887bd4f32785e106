"""`alexnet` subcommands. Parsing only; each command calls into its module.

Every `UserError` (bad file, option, data or checkpoint) ends as one line on stderr and exit
status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import signal
import stat
import sys
import threading
from pathlib import Path


def _prepare(a: argparse.Namespace) -> int:
    from alexnet.data import default_data_dir, prepare

    from alexnet.errors import UserError

    try:
        counts = None if a.counts == "any" else tuple(int(c) for c in a.counts.split(","))
    except ValueError:
        counts = ()
    if counts is not None and (len(counts) != 3 or min(counts) < 1):
        raise UserError(f"--counts must be CLASSES,TRAIN_PER_CLASS,VAL_PER_CLASS (positive integers) or 'any', "
                        f"got {a.counts!r}")
    # SIGTERM and SIGHUP (a scheduler, a closed terminal) end it as Ctrl-C does: through its
    # clean-up, which removes the half-written arrays, not by the default action, which leaves them.
    def leave(signum: int, frame: object) -> None:
        # A second one (a launcher passes it on, a user repeats it) ends the process at once
        # instead of interrupting the clean-up (it hung in the decoding pool's shutdown); the
        # next prepare removes what that leaves.
        for s in installed:  # an ignored one (nohup's SIGHUP) stays ignored
            signal.signal(s, signal.SIG_DFL)
        raise SystemExit(128 + signum)

    # Signal handlers can only be set from the main thread (a caller may run main() in another).
    main_thread = threading.current_thread() is threading.main_thread()
    stops = [getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n)] if main_thread else []
    previous = {s: signal.getsignal(s) for s in stops}
    installed = [s for s, h in previous.items() if h is not signal.SIG_IGN]
    for s in installed:
        signal.signal(s, leave)
    try:
        prepare(a.source, Path(a.data) if a.data else default_data_dir(), counts=counts, img_size=a.img_size,
                md5=a.md5, workers=a.workers, force=a.force)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return 0


def _train(a: argparse.Namespace) -> int:
    from alexnet.config import resolve
    from alexnet.train import fit

    fit(resolve(a))
    return 0


def _evaluate(a: argparse.Namespace) -> int:
    from alexnet.inference import run_evaluate

    from alexnet.errors import UserError

    if len(a.paths) > 2:
        raise UserError(f"evaluate takes [MODEL_FILE] CHECKPOINT, got {len(a.paths)} paths: {' '.join(a.paths)}")
    if len(a.paths) == 1 and a.paths[0].endswith(".py"):
        raise UserError(f"evaluate takes [MODEL_FILE] CHECKPOINT; got only the model file {a.paths[0]} "
                        f"(e.g. evaluate.py {a.paths[0]} results/best.pth)")
    model, ckpt = (a.paths[0], a.paths[1]) if len(a.paths) == 2 else (None, a.paths[0])
    if model is not None and not model.endswith(".py"):
        swapped = f"; swapped? evaluate {ckpt} {model}" if ckpt.endswith(".py") else " (one checkpoint at a time)"
        raise UserError(f"evaluate takes [MODEL_FILE] CHECKPOINT, and the model file is a .py file; got {model}{swapped}")
    run_evaluate(model, ckpt, data=a.data, device=a.device, bs=a.bs, tta=a.tta, per_class=a.per_class, amp=a.amp)
    return 0


def _predict(a: argparse.Namespace) -> int:
    from alexnet.inference import run_predict

    from alexnet.errors import UserError

    if a.topk < 1:
        raise UserError(f"--topk must be at least 1, got {a.topk}")
    batch = {} if a.bs is None else {"bs": a.bs}  # the default lives with run_predict
    run_predict(a.checkpoint, a.images, model_file=a.model, device=a.device, topk=a.topk, csv_path=a.csv, **batch)
    return 0


def _summary(a: argparse.Namespace) -> int:
    from alexnet.summary import print_summary

    print_summary(a.target, img_size=a.img_size, num_classes=a.num_classes)
    return 0


def _ablate(a: argparse.Namespace) -> int:
    from alexnet.ablate import run_ablation

    run_ablation(a)
    return 0


def _report(a: argparse.Namespace) -> int:
    from alexnet.report import build_report

    build_report(Path(a.runs))
    return 0


def _bench(a: argparse.Namespace) -> int:
    from alexnet.bench import run_bench

    run_bench(a)
    return 0


def build_parser(script: str | None = None, command: str | None = None) -> argparse.ArgumentParser:
    """`script`: the seed's entry point (train.py, evaluate.py) that runs one subcommand, named
    in that subcommand's usage and errors instead of `alexnet <command>`. `command`: the one
    that will run, when known; then `bench`'s options, whose choices import torch (3 s and 0.6
    GB resident on a 2-core machine), are only built for `bench`, and `prepare` or `--help` is quick."""
    from alexnet.config import add_train_args

    p = argparse.ArgumentParser(prog="alexnet", description="AlexNet and its variants on TinyImageNet-200")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("prepare", help="download/validate TinyImageNet-200 (or an image folder) into a uint8 cache")
    s.add_argument("--source", help="the official URL (default; or $ALEXNET_SOURCE), a local .zip, an extracted tiny-imagenet-200/ "
                                    "folder, or an image-folder root (root/train/<class>/*, root/val/<class>/*)")
    s.add_argument("--data", help="cache directory (default ./data or $ALEXNET_DATA)")
    s.add_argument("--md5", help="expected MD5 of the archive: a download, or a local .zip (known for the official URL)")
    s.add_argument("--counts", default="200,500,50",
                   help="expected CLASSES,TRAIN_PER_CLASS,VAL_PER_CLASS for the TinyImageNet layout, or 'any' "
                        "(default 200,500,50: the official data set)")
    s.add_argument("--img-size", type=int, default=64, help="image size of the cache: image folders are resized to it; TinyImageNet-200 is cached at its 64")
    s.add_argument("--workers", type=int, default=2, help="decoding processes")
    s.add_argument("--force", action="store_true", help="rebuild even if the cache is up to date")
    s.set_defaults(func=_prepare)

    s = sub.add_parser("train", help="train a model file or a registered variant",
                       **({"prog": f"python {script}"} if script == "train.py" else {}))
    add_train_args(s)
    s.set_defaults(func=_train)

    s = sub.add_parser("evaluate", help="top-1/top-5/loss of a checkpoint on the val split",
                       usage="%(prog)s [-h] [options] [MODEL_FILE] CHECKPOINT",
                       **({"prog": f"python {script}"} if script == "evaluate.py" else {}))
    s.add_argument("paths", nargs="+", metavar="PATH",
                   help="[MODEL_FILE] CHECKPOINT: a checkpoint, optionally after the model file (.py) it was trained from")
    s.add_argument("--data", help="cache directory (default ./data or $ALEXNET_DATA)")
    s.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto, cpu or cuda (default: auto)")
    s.add_argument("--bs", type=int, default=500, help="val images evaluated at a time (default: %(default)s)")
    s.add_argument("--tta", default="none", choices=("none", "flip", "10crop"),
                   help="test-time augmentation: mirror images, or the paper's ten crops")
    s.add_argument("--per-class", metavar="FILE", help="write per-class accuracy and most-confused pairs (CSV)")
    s.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: as the checkpoint was trained)")
    s.set_defaults(func=_evaluate)

    s = sub.add_parser("predict", help="top-5 classes of image files (or of the images in folders)")
    s.add_argument("checkpoint")
    s.add_argument("images", nargs="+", help="image files, or folders searched recursively for them")
    s.add_argument("--csv", metavar="FILE", help="write each image's classes to FILE, one row an image, instead of printing them")
    s.add_argument("--bs", type=int, default=None, help="images classified at a time (default 256)")
    s.add_argument("--model", help="model file, for checkpoints of custom (non-registry) models")
    s.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto, cpu or cuda (default: auto)")
    s.add_argument("--topk", type=int, default=5, help="classes shown per image (default: %(default)s)")
    s.set_defaults(func=_predict)

    s = sub.add_parser("summary", help="layer shapes, parameters and MFLOPs of a variant (or all)")
    s.add_argument("target", nargs="?", help="a variant name or a model file (default: table of all variants)")
    s.add_argument("--img-size", type=int, default=64)
    s.add_argument("--num-classes", type=int, default=200)
    s.set_defaults(func=_summary)

    s = sub.add_parser("ablate", help="train every variant under one budget and write the results table")
    from alexnet.ablate import add_ablate_args

    add_ablate_args(s)
    s.set_defaults(func=_ablate)

    s = sub.add_parser("report", help="rebuild the results table and plots from finished runs")
    s.add_argument("runs", nargs="?", default="runs")
    s.set_defaults(func=_report)

    s = sub.add_parser("bench", help="training throughput: model alone, full path, per-image reference")
    if command in (None, "bench"):
        from alexnet.bench import add_bench_args

        add_bench_args(s)
    s.set_defaults(func=_bench)
    p.commands = sub.choices  # each command's own parser, for its own usage line in errors
    return p


def main(argv: list[str] | None = None, script: str | None = None) -> int:
    from alexnet.errors import UserError
    from alexnet.allocator import keep_freed_memory

    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), "")  # the top level has no options of its own
    parser = build_parser(script, command)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the command's parser: `python train.py: error: ...`, not the top level's usage
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    keep_freed_memory()
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, not at exit: a reader that left is then this try's to handle
        return code
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if not stat.S_ISFIFO(os.fstat(sys.stdout.fileno()).st_mode):
            raise  # not our output's reader that went away
        # The reader went away (`alexnet predict ... | head`): nothing left to say, and Python's
        # own flush at exit must not fail again on the closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a writer its reader left
    except (OSError, RuntimeError, MemoryError) as e:  # RuntimeError: torch.save's, around the OSError
        failed = _storage_failure(e)
        from alexnet.loader import WORKER_ADVICE, worker_death  # torch is loaded by now

        if failed is None and (died := worker_death(e)):
            advice = {"train": f": {WORKER_ADVICE}; the last checkpoint is whole, continue with --resume",
                      "ablate": f": {WORKER_ADVICE}; the same command again continues the study"}
            print(f"error: {died}{advice.get(args.command, '')}", file=sys.stderr)
            return 2
        if failed is None and (memory := _memory_failure(e)):
            print(f"error: out of memory ({memory}): a smaller --bs or --img-size needs less (a training run's "
                  "last.pth, if it has one, is whole: it continues with --resume where the memory is there)",
                  file=sys.stderr)
            return 2
        if failed is None:
            raise
        where = f" writing {failed.filename}" if failed.filename else ""
        print(f"error: {failed.strerror}{where}. What was written before is whole (files are replaced only once "
              "complete): make room and run the command again (a training run continues with --resume)",
              file=sys.stderr)
        return 2


def _memory_failure(e: BaseException) -> str | None:
    """What ran out, where an allocation failed: the CPU's (PyTorch's "can't allocate memory",
    numpy's MemoryError) or a GPU's (torch.OutOfMemoryError, named here without importing
    torch); None for any other error."""
    text = str(e)
    if isinstance(e, MemoryError) or "can't allocate memory" in text:
        asked = re.search(r"tried to allocate (\d+) bytes", text)
        return f"the CPU: {int(asked[1]) / 2**30:,.1f} GiB asked for at once" if asked else "the CPU"
    if type(e).__name__ == "OutOfMemoryError":  # CUDA's message names the GPU and the sizes
        return text.splitlines()[0].rstrip(". ") if text else "the GPU"
    return None


def _storage_failure(e: BaseException | None) -> OSError | None:
    """The full disk or read-only file system behind an exception, if that is what it is."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            return e
        e = e.__cause__ or e.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
