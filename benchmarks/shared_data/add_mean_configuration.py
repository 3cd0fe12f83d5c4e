"""Store a model's mean landmark configuration (its canonical pose) in a copy of the model file.

    python benchmarks/shared_data/add_mean_configuration.py MODEL DATASET.toml --out OUT [--split train] [--detected]

For models trained before model files carried one: the mean position of each landmark over the
split's images (the images the model was trained on), in their physical frame: their annotations
(what `train` stores for new models), or with --detected the model's own points on them (found in
their own pose). The weights are copied byte for byte (`save_description`).

--detected makes a training image in its training pose its own canonical pose exactly: fitted to
annotations, the brain model's points on its single training image give a pose 0.2 degrees off, and
moved copies were then all brought into that pose, whose points differ from the unmoved image's by
0.5 mm on average (the network is that sensitive to a small turn of its grid).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from SCNLandmarksLib.bundle import read_description, save_description
from SCNLandmarksLib.data.spec import load_dataset_spec
from SCNLandmarksLib.inference import Predictor
from SCNLandmarksLib.pose import mean_configuration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("dataset")
    parser.add_argument("--split", default="train")
    parser.add_argument("--out", required=True)
    parser.add_argument("--detected", action="store_true", help="the model's points on the images, not the annotations")
    args = parser.parse_args()
    description = read_description(args.model)
    spec = load_dataset_spec(args.dataset)
    if tuple(spec.landmark_names) != description.landmark_names:
        parser.error(f"{args.dataset}: its landmarks are not the model's ({list(description.landmark_names)})")
    entries = spec.split(args.split)
    if args.detected:
        predictor = Predictor.from_file(args.model, "cpu")
        landmarks = [predictor.predict(e.read(predictor.dimension), source=str(e.image)).landmarks for e in entries]
        what = "the model's own points on"
    else:
        landmarks = list(spec.load_landmarks(entries).values())
        what = "the annotated landmarks of"
    mean = mean_configuration(
        landmarks,
        f"mean of {what} the {len(entries)} '{args.split}' images of "
        f"{spec.path.name} (the training images), in their own pose",
    )
    save_description(args.model, args.out, dataclasses.replace(description, mean_configuration=mean))
    print(json.dumps({"model": args.out, "mean_configuration": mean.to_json()}))


if __name__ == "__main__":
    main()
