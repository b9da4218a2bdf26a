"""Key coder speed: range coding and decoding the keys of 512x512 images, and their bytes.

    python benchmarks/key_coder_speed.py --model cxr [--images 6] [--rounds 7]
    python benchmarks/key_coder_speed.py --model cxr --refit splits/v2/train.txt --images 25

Shares each image once (encoder's code, no refinement), then times the model's key coder alone
on those keys: `encode` (code -> key payload) and `decode` (payload -> code), seconds per image
(median over rounds, all images per round). Prints the CPU and a digest of all payloads: run it
in two checkouts on the same machine to compare their speed, and their bytes (equal digests:
the same keys). With ``--refit LIST`` it measures instead two key models fitted to the codes of
LIST's images (encoded once, as `primis.sharing.fit_image_keys` does), without and with
couplings, on the same images: their payload bits per pixel and speed side by side. Writes
JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from primis.data import resolve_sources
from primis.io.images import read_image
from primis.io.pixels import IntensityMapping
from primis.keys import KeyModel, fit_key_model
from primis.modelstore import load_model
from primis.obfuscation import code_to_vectors
from primis.report import describe_machine, machine_info, write_json
from primis.sharing import ImageToShare, encode_images, reconstruct, share_images

try:
    from benchmarks.holdout import DATA, holdout_split
    from benchmarks.inference_speed import images_512
except ModuleNotFoundError:  # run as a script from the repository root
    from holdout import DATA, holdout_split
    from inference_speed import images_512


class _Recorder:
    """Wraps a key coder and keeps the arguments of each call to one of its methods."""

    def __init__(self, coder, method: str) -> None:
        self.calls: list[tuple[tuple, dict]] = []
        self._coder, self._method = coder, getattr(coder, method)
        self._name = method

    def __enter__(self) -> list[tuple[tuple, dict]]:
        def record(*args, **kwargs):
            self.calls.append((args, kwargs))
            return self._method(*args, **kwargs)

        setattr(self._coder, self._name, record)
        return self.calls

    def __exit__(self, *exc) -> None:
        delattr(self._coder, self._name)  # back to the class's method


def measure(
    model_name: str, data: Path, count: int, rounds: int, key_model: KeyModel | None = None
) -> dict:
    """Per-image seconds of the key coder's encode and decode on ``count`` 512x512 images (with
    ``key_model`` instead of the model's own), and the payloads' mean size."""
    model = load_model(model_name)
    if key_model is not None:
        model = dataclasses.replace(model, key_model=key_model)
    items = [
        ImageToShare(IntensityMapping.of(p).forward(p), IntensityMapping.of(p))
        for p in images_512(holdout_split(data)["test"], count)
    ]
    coder = model.key_coder
    with _Recorder(coder, "encode") as encodes:
        shared = [share_images([i], model, model.obfuscation, refine_steps=0)[0] for i in items]
    with _Recorder(coder, "decode") as decodes:
        for item in shared:
            reconstruct(item.public, item.key, model)
    timings: dict[str, list[float]] = {"encode": [], "decode": []}
    outputs: dict[str, list] = {}
    for _ in range(rounds):
        for name, calls in (("encode", encodes), ("decode", decodes)):
            method = getattr(coder, name)
            started = time.perf_counter()
            outputs[name] = [method(*args, **kwargs) for args, kwargs in calls]
            timings[name].append((time.perf_counter() - started) / len(calls))
    for (args, _), decoded in zip(encodes, outputs["decode"], strict=True):
        if not np.array_equal(args[0], decoded):
            raise SystemExit("a key did not decode to its code: the timings would mislead")
    payloads = outputs["encode"]
    return {
        "model": model_name,
        "images": count,
        "rounds": rounds,
        "encode_seconds": statistics.median(timings["encode"]),
        "decode_seconds": statistics.median(timings["decode"]),
        "mean_payload_bytes": float(np.mean([len(p) for p in payloads])),
        "payload_bits_per_pixel": 8 * sum(len(p) for p in payloads) / (512 * 512 * count),
        "payload_digest": hashlib.sha256(b"".join(payloads)).hexdigest()[:16],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cxr")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--refit", type=Path, help="compare key models fitted to these images")
    parser.add_argument("--json", type=Path, default=Path("runs/key_coder_speed.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    key_models: dict[str, KeyModel | None] = {"own key model": None}
    if args.refit:
        model = load_model(args.model)
        k = model.network.config.k
        codes = [
            encode_images(model, [read_image(p)[0]], k, 0)[0] for p in resolve_sources(args.refit)
        ]
        vectors = [(code_to_vectors(c), tuple(c.shape[3:])) for c in codes]  # encoded once
        key_models = {
            f"{'with' if couplings else 'no'} couplings": fit_key_model(
                vectors, k, couplings=couplings
            )
            for couplings in (False, True)
        }
    results = {
        name: measure(args.model, args.data, args.images, args.rounds, key_model)
        for name, key_model in key_models.items()
    }
    report = {"machine": machine_info(), "refit": str(args.refit or ""), "results": results}
    print(describe_machine(report["machine"]))
    for name, result in results.items():
        print(
            f"{result['model']}, {name}: {result['images']} images of 512x512, median of"
            f" {args.rounds} rounds: encode {1000 * result['encode_seconds']:.2f} ms, decode"
            f" {1000 * result['decode_seconds']:.2f} ms per image; payload"
            f" {result['payload_bits_per_pixel']:.4f} bits per pixel, digest"
            f" {result['payload_digest']}"
        )
    write_json(args.json, report)
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
