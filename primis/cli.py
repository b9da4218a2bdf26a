"""The `primis` command line. Every failure ends in one line on stderr and a non-zero exit."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from primis.errors import PrimisError


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="primis")
def cli() -> None:
    """PRIMIS: share medical images as public sparse codes plus small private keys."""


@cli.command()
@click.argument("root", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path))
@click.option("--ratios", nargs=3, type=float, default=(0.9, 0.05, 0.05), show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--group-by", help="regex on file names; its first group keeps images together")
def split(root: Path, out_dir: Path, ratios, seed: int, group_by: str | None) -> None:
    """Write train.txt, valid.txt and test.txt (paths relative to --out) for ROOT's images."""
    import os

    from primis.data import resolve_sources, split_paths
    from primis.imageio import write_atomic

    paths = resolve_sources(root)
    for name, part in split_paths(paths, ratios, seed, group_by).items():
        lines = "".join(f"{Path(os.path.relpath(p, out_dir)).as_posix()}\n" for p in part)
        write_atomic(out_dir / f"{name}.txt", lines.encode())
        click.echo(f"{name}: {len(part)} images -> {out_dir / f'{name}.txt'}")


@cli.command()
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="YAML or JSON")
@click.option("--data", type=click.Path(path_type=Path), help="folder or list file")
@click.option("--valid", type=click.Path(path_type=Path), help="validation folder or list file")
@click.option("--out", type=click.Path(path_type=Path), help="run directory")
@click.option(
    "--resume",
    "resume",
    is_flag=False,
    flag_value="",
    default=None,
    help="continue the run in RUN (or --out) from its last checkpoint",
)
@click.option("--max-steps", type=int, help="override train.steps")
@click.option("--max-minutes", type=float, help="time budget; the schedule fits it")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]))
@click.option("--threads", type=int, help="CPU threads for torch")
@click.option("--strict", is_flag=True, help="stop at the first unreadable training image")
def train(
    config_file, data, valid, out, resume, max_steps, max_minutes, device, threads, strict
) -> None:
    """Train a Sparse Ternary AutoEncoder; the run directory then serves as --model."""
    from primis.config import RunConfig, load_run_config, parse_config
    from primis.data import resolve_sources, scan_images, split_paths
    from primis.imageio import write_atomic
    from primis.train import load_run
    from primis.train import train as run_training

    if resume is not None:
        out = Path(resume) if resume else out
        if out is None:
            raise PrimisError("--resume needs the run directory (--resume RUN or --out RUN)")
        if config_file or data or valid:
            raise PrimisError("--resume takes its config and data from the run directory")
        config = load_run(out)
        data, valid = out / "train.txt", out / "valid.txt"
    else:
        if data is None or out is None:
            raise PrimisError("train needs --data and --out (or --resume RUN)")
        config = load_run_config(config_file)
    overrides = {
        "steps": max_steps,
        "max_minutes": max_minutes,
        "device": device,
        "threads": threads,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides:
        merged = config.model_dump()
        merged["train"].update(overrides)
        config = parse_config(RunConfig, merged, "command line")
    paths = resolve_sources(data)
    if resume is None:
        if valid is not None:
            valid_paths = resolve_sources(valid)
        else:
            parts = split_paths(paths, (0.95, 0.05, 0.0), config.train.seed)
            paths, valid_paths = parts["train"], parts["valid"] or parts["train"][:1]
        paths, problems = scan_images(paths, strict)
        valid_paths, valid_problems = scan_images(valid_paths, strict)
        problems += valid_problems
        for problem in problems:
            click.echo(f"skipped: {problem}", err=True)
        if not paths or not valid_paths:
            raise PrimisError("no readable training or validation images")
        out.mkdir(parents=True, exist_ok=True)
        for name, part in (("train.txt", paths), ("valid.txt", valid_paths)):
            write_atomic(out / name, "".join(f"{p.resolve()}\n" for p in part).encode())
    else:
        valid_paths, problems = resolve_sources(valid), []
    click.echo(f"training on {len(paths)} images, validating on {len(valid_paths)}; run: {out}")
    result = run_training(config, paths, valid_paths, out, resume=resume is not None)
    click.echo(
        f"done: step {result.steps} after {result.seconds / 60:.1f} min; best pure-ternary "
        f"validation PSNR {result.best_psnr:.2f} dB; model in {out}"
        + (f"; {len(problems)} unreadable file(s) skipped" if problems else "")
    )


def _model_option(func):
    return click.option(
        "--model",
        "model_dir",
        required=True,
        type=click.Path(path_type=Path),
        help="trained run directory",
    )(func)


@cli.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@_model_option
@click.option("--public-dir", required=True, type=click.Path(path_type=Path))
@click.option("--key-dir", required=True, type=click.Path(path_type=Path))
@click.option("--k", "k", type=int, help="non-zeros per sign (at most the model's k)")
@click.option("--fill", type=float, help="fraction of zero entries filled with noise")
@click.option("--mask-signs/--no-mask-signs", default=None, help="hide the signs of true entries")
def ambiguate(inputs, model_dir, public_dir, key_dir, k, fill, mask_signs) -> None:
    """Turn each image into PUBLIC_DIR/<stem>.primis and KEY_DIR/<stem>.primiskey."""
    from primis.config import ObfuscationConfig, parse_config
    from primis.imageio import list_images, read_source, write_atomic
    from primis.modelstore import load_model
    from primis.sharing import share_image

    model = load_model(model_dir)
    settings = model.obfuscation.model_dump()
    settings.update(
        {k_: v for k_, v in {"fill": fill, "mask_signs": mask_signs}.items() if v is not None}
    )
    obfuscation = parse_config(ObfuscationConfig, settings, "obfuscation options")
    failures = 0
    for path in list_images(list(inputs)):
        try:
            started = time.perf_counter()
            image = read_source(path)
            mapping = image.mapping
            shared = share_image(
                mapping.forward(image.pixels), mapping, model, obfuscation, k, source=image.details
            )
            key_path = key_dir / f"{path.stem}.primiskey"
            write_atomic(key_path, shared.key, mode=0o600)
            write_atomic(public_dir / f"{path.stem}.primis", shared.public)
            click.echo(
                f"{path.name}: public {len(shared.public)} B, key {len(shared.key)} B "
                f"({8 * len(shared.key) / shared.pixels:.3f} bpp; "
                f"ideal {shared.ideal_key_bits / 8:.0f} B) "
                f"in {time.perf_counter() - started:.2f} s"
            )
        except PrimisError as err:
            failures += 1
            _fail(str(err))
    _finish(failures)


@cli.command()
@click.argument("publics", nargs=-1, required=True, type=click.Path(path_type=Path))
@_model_option
@click.option("--key-dir", type=click.Path(path_type=Path), help="folder of <stem>.primiskey")
@click.option("--out-dir", required=True, type=click.Path(path_type=Path))
@click.option("--without-key", is_flag=True, help="write what an attacker decodes instead")
def disambiguate(publics, model_dir, key_dir, out_dir, without_key) -> None:
    """Reconstruct each PUBLIC file with its key (or, --without-key, show the attacker's view)."""
    from primis.formats import read_file
    from primis.imageio import encode_image, output_suffix, write_atomic
    from primis.modelstore import load_model
    from primis.sharing import attacker_view, reconstruct

    if key_dir is None and not without_key:
        raise PrimisError("--key-dir is required (or --without-key for the attacker's view)")
    model = load_model(model_dir)
    failures = 0
    for path in publics:
        try:
            public = read_file(path)
            if without_key:
                import numpy as np

                view = attacker_view(public, model, str(path))
                pixels, suffix = np.rint(view * 255).astype(np.uint8), ".png"
            else:
                key_path = key_dir / f"{path.stem}.primiskey"
                pixels, key = reconstruct(
                    public, read_file(key_path), model, str(path), str(key_path)
                )
                suffix = output_suffix(key.header.source, pixels.dtype)
            target = out_dir / f"{path.stem}{suffix}"
            write_atomic(target, encode_image(pixels, suffix))
            click.echo(f"{path.name} -> {target}")
        except PrimisError as err:
            failures += 1
            _fail(str(err))
    _finish(failures)


@cli.command()
@click.argument("file", type=click.Path(path_type=Path))
def info(file: Path) -> None:
    """Describe a public file, a key file or a model directory (as JSON)."""
    from primis.formats import KEY_MAGIC, PUBLIC_MAGIC, KeyFile, PublicFile, read_file

    if file.is_dir():
        from primis.modelstore import load_model

        model = load_model(file)
        cfg = model.network.config
        report = {
            "kind": "model",
            "hash": model.hash,
            "model": cfg.model_dump(),
            "downsampling": cfg.downsampling,
            "obfuscation": model.obfuscation.model_dump(),
        }
    else:
        data = read_file(file)
        if data[:8] == KEY_MAGIC:
            key = KeyFile.from_bytes(data, str(file))
            report = key.header.model_dump() | {
                "bytes": len(data),
                "payload_bytes": len(key.payload),
            }
        elif data[:8] == PUBLIC_MAGIC:
            from primis.obfuscation import key_size

            public = PublicFile.from_bytes(data, str(file))
            ideal, packed = key_size(public.vectors, public.header.k, public.header.mask_signs)
            report = public.header.model_dump() | {
                "bytes": len(data),
                "vectors": int(public.vectors.shape[0]),
                "ideal_key_bits": round(ideal, 1),
                "key_payload_bytes": packed,
            }
        else:
            raise PrimisError(f"{file}: not a PRIMIS public or key file")
    click.echo(json.dumps(report, indent=2))


def _finish(failures: int) -> None:
    if failures:
        raise PrimisError(f"{failures} file(s) failed")


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the command; PrimisError becomes 'error: ...' and exit status 1."""
    try:
        result = cli.main(args=argv, prog_name="primis", standalone_mode=False)
        sys.exit(result if isinstance(result, int) else 0)
    except PrimisError as err:
        _fail(str(err))
        sys.exit(1)
    except click.exceptions.Abort:
        _fail("aborted")
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted")
        sys.exit(130)
